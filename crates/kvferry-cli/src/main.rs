//! The `kvferry` command: `bench` measures transports, `serve` hosts a target buffer, `info` lists
//! what this machine and build can use.

use clap::{Parser, Subcommand};
use kvferry_cli::{bench, gpu_bench, info, serve, soak};

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

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KVFERRY_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(&args),
        Command::GpuBench(args) => gpu_bench::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Info { json } => info::run(json),
    };
    if let Err(e) = result {
        eprintln!("kvferry: {e:#}");
        std::process::exit(1);
    }
}
