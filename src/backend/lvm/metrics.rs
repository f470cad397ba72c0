//! How often lvm2 runs and how long it takes, by tool: the figure that shows
//! a node keeps to one `lvcreate` and one `lvremove` per volume.

use std::sync::LazyLock;

use crate::metrics::{CounterVec, HistogramVec, LATENCY_BUCKETS};

struct CommandMetrics {
    calls: CounterVec,
    seconds: HistogramVec,
}

static COMMANDS: LazyLock<CommandMetrics> = LazyLock::new(|| CommandMetrics {
    calls: CounterVec::default(),
    seconds: HistogramVec::new(LATENCY_BUCKETS),
});

/// One lvm2 command ran (successfully or not) for `seconds`.
pub fn observe(tool: &str, seconds: f64) {
    COMMANDS.calls.inc(&[tool]);
    COMMANDS.seconds.observe(tool, seconds);
}

/// Commands of `tool` run by this process so far.
pub fn count(tool: &str) -> u64 {
    COMMANDS.calls.get(&[tool])
}

/// Append the lvm2 families to a scrape.
pub fn render(out: &mut String) {
    COMMANDS.calls.render(
        out,
        "kennel_lvm_commands_total",
        "lvm2 commands run, by command.",
        &["command"],
    );
    COMMANDS.seconds.render(
        out,
        "kennel_lvm_command_duration_seconds",
        "Time an lvm2 command took, by command.",
        "command",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_counted_and_timed_by_tool() {
        let before = count("vgck-test");
        observe("vgck-test", 0.02);
        observe("vgck-test", 0.2);
        assert_eq!(count("vgck-test"), before + 2);
        let mut out = String::new();
        render(&mut out);
        assert!(
            out.contains("kennel_lvm_commands_total{command=\"vgck-test\"} 2\n"),
            "{out}"
        );
        assert!(out.contains(
            "kennel_lvm_command_duration_seconds_bucket{command=\"vgck-test\",le=\"0.025\"} 1\n"
        ));
    }
}
