use std::io::IsTerminal as _;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "kennel",
    version,
    about = "Node-local persistent storage for Kubernetes StatefulSets"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services.
    Driver(Box<kennel::driver::DriverArgs>),
    /// StatefulSet PVC retention controller (runs in the cluster).
    Retention(kennel::retention::RetentionArgs),
    /// Node-local orphan accounting: volumes without PVs, PVs without volumes.
    Orphans(kennel::retention::orphan_sweeper::OrphanArgs),
    /// The StatefulSet walk-through on this machine: real driver, real loop volumes.
    Demo(kennel::demo::DemoArgs),
    /// Measure volume lifecycles against a real driver, with a same-run baseline.
    Bench(kennel::bench::BenchArgs),
    /// Talk to a CSI driver by hand.
    Ctl(kennel::ctl::CtlArgs),
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only for a person at a terminal: files, pipes and container logs get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Daemons log; commands for people print and keep the log quiet unless asked.
    let daemon = matches!(
        cli.command,
        Command::Driver(_) | Command::Retention(_) | Command::Orphans(_)
    );
    init_logging(cli.log_format, if daemon { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kennel: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Driver(args) => kennel::driver::run(*args).await.map_err(Into::into),
            Command::Ctl(args) => kennel::ctl::run(args).await,
            Command::Demo(args) => kennel::demo::run(args).await,
            Command::Retention(args) => kennel::retention::run(args).await,
            Command::Orphans(args) => kennel::retention::orphan_sweeper::run(args).await,
            Command::Bench(args) => kennel::bench::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if daemon {
                tracing::error!("{e:#}");
            } else {
                eprintln!("kennel: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
