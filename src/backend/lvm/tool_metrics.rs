//! How often lvm2 runs and how long it takes, by tool: the figure that shows
//! a node keeps to one `lvcreate` and one `lvremove` per volume.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics_endpoint::LATENCY_BUCKETS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
}

struct CommandMetrics {
    calls: Family<CommandLabels, Counter>,
    seconds: Family<CommandLabels, Histogram>,
}

static COMMANDS: LazyLock<CommandMetrics> = LazyLock::new(|| CommandMetrics {
    calls: Family::default(),
    seconds: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS.iter().copied())),
});

fn labels(tool: &str) -> CommandLabels {
    CommandLabels {
        command: tool.to_owned(),
    }
}

/// One lvm2 command ran (successfully or not) for `seconds`.
pub fn observe(tool: &str, seconds: f64) {
    COMMANDS.calls.get_or_create(&labels(tool)).inc();
    COMMANDS
        .seconds
        .get_or_create(&labels(tool))
        .observe(seconds);
}

/// Commands of `tool` run by this process so far.
pub fn count(tool: &str) -> u64 {
    COMMANDS.calls.get_or_create(&labels(tool)).get()
}

/// Adds the lvm2 families to a driver's registry.
pub fn register(registry: &mut Registry) {
    registry.register(
        "kennel_lvm_commands",
        "lvm2 commands run, by command",
        COMMANDS.calls.clone(),
    );
    registry.register(
        "kennel_lvm_command_duration_seconds",
        "Time an lvm2 command took, by command",
        COMMANDS.seconds.clone(),
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
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(
            out.contains("kennel_lvm_commands_total{command=\"vgck-test\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "kennel_lvm_command_duration_seconds_bucket{le=\"0.025\",command=\"vgck-test\"} 1\n"
            ),
            "{out}"
        );
    }
}
