//! The `kvferry` command line: `bench` measures transports, `serve` hosts a target buffer, `info`
//! lists what this machine and build can use. The native binary and the Python package's
//! `kvferry` console script both run [`run`].

use std::ffi::OsString;
use std::process::Command as Process;

use clap::{Parser, Subcommand};

use crate::{bench, gpu_bench, info, serve, soak};

/// Set by the Python package's launcher to the interpreter running it: the command then runs
/// inside `python -m kvferry`, and commands that start copies of themselves (`soak`'s targets,
/// `gpu-bench`'s ipc owner) start that, not the interpreter's own executable.
pub const PYTHON_LAUNCHER_ENV: &str = "KVFERRY_CLI_PYTHON";

#[derive(Parser)]
#[command(name = "kvferry", version, about = "KV-cache transfer data plane: benchmarks and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure transfer bandwidth and latency over block and batch sizes.
    Bench(bench::BenchArgs),
    /// Measure GPU copies, cuda-ipc and staged transfers next to the device's own limits.
    GpuBench(gpu_bench::GpuBenchArgs),
    /// Host a registered buffer that initiators can read and write.
    Serve(serve::ServeArgs),
    /// Transfers across processes while targets are killed, stopped and restarted, transfers
    /// cancelled and registrations dropped; every byte checked, resources reported.
    Soak(soak::SoakArgs),
    /// List devices and transports available here.
    Info {
        #[arg(long)]
        json: bool,
    },
}

/// Run the command line `args` (the program's name first); returns the exit status. Bad
/// arguments, `--help` and `--version` print and exit the process, as command lines do.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // A second run in one process (the Python package's) keeps the first one's subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KVFERRY_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let result = match Cli::parse_from(args).command {
        Command::Bench(args) => bench::run(&args),
        Command::GpuBench(args) => gpu_bench::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Info { json } => info::run(json),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kvferry: {e:#}");
            1
        }
    }
}

/// A process running this command line again (for a subcommand's children).
pub fn self_command() -> std::io::Result<Process> {
    match std::env::var_os(PYTHON_LAUNCHER_ENV) {
        Some(python) => {
            let mut command = Process::new(python);
            command.args(["-m", "kvferry"]);
            Ok(command)
        }
        None => Ok(Process::new(std::env::current_exe()?)),
    }
}
