//! `kvferry gpu-bench`: the GPU data paths next to the device's own limits, measured in one run.
//!
//! - `copy`: batched H2D / D2H of scattered blocks (one `copy_batch`) against one contiguous copy of
//!   the same bytes from the same pinned buffer (what `tensor.to(device, non_blocking=True)` does
//!   for a pinned torch tensor); when Python with torch is installed, torch's own pinned copy too.
//! - `ipc`: device-to-device READ and WRITE through `cuda-ipc` with a second process, against a D2D
//!   copy inside this process.
//! - `staging`: device → TCP → device between two agents that stage through pinned host memory,
//!   against the same transfer between host buffers (TCP's zero-copy path).
//!
//! `--device host` runs `copy` and `staging` with host memory, which shows what the machinery costs
//! without a GPU. With a GPU device that cannot be opened, the command says why and exits cleanly.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvferry::memory::host::{HostAllocOptions, HostBuffer};
use kvferry::{
    Agent, AgentConfig, CopyOp, Deadline, Device, ErrorCode, HostDevice, LocalDescs, MemRegion, Memory, RemoteDescs,
    StagingConfig,
};
use serde::Serialize;

use crate::units;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Copy,
    Ipc,
    Staging,
}

#[derive(clap::Args, Debug, Clone)]
pub struct GpuBenchArgs {
    /// `cuda:N`, `rocm:N`, or `host` (the same paths with host memory).
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Bytes per block (one copy each). 64K is one 16-token block of one layer of an 8-KV-head,
    /// 128-dim fp16 model, K and V together.
    #[arg(long, default_value = "64K,256K,1M,4M", value_parser = units::parse_size_list)]
    pub block_sizes: std::vec::Vec<u64>,
    /// Blocks per batch.
    #[arg(long, default_value_t = 64)]
    pub blocks: usize,
    /// Seconds per row after one warm-up.
    #[arg(long, default_value_t = 0.5)]
    pub min_time: f64,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "copy,ipc,staging")]
    pub parts: Vec<Part>,
    #[arg(long)]
    pub json: bool,
    /// Internal: run as the peer process of the `ipc` part.
    #[arg(long, hide = true)]
    pub ipc_owner: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuRow {
    pub part: &'static str,
    pub what: String,
    pub block_size: u64,
    pub blocks: usize,
    /// 1e9 bytes per second.
    pub gbps: f64,
    /// What the same bytes reach on the reference path measured in this run.
    pub reference: &'static str,
    pub reference_gbps: f64,
}

pub fn run(args: &GpuBenchArgs) -> anyhow::Result<()> {
    let device = match open_device(&args.device) {
        Ok(d) => d,
        Err(e) if matches!(e.code(), ErrorCode::NoDriver | ErrorCode::NoDevice) => {
            println!("skipping GPU benchmarks: {e}");
            return Ok(());
        }
        Err(e) => return Err(e).context(format!("opening {}", args.device)),
    };
    let largest = args.block_sizes.iter().max().copied().unwrap_or(0) as usize * args.blocks;
    if args.ipc_owner {
        return ipc_owner(args, largest);
    }
    let mut rows = Vec::new();
    for part in &args.parts {
        match part {
            Part::Copy => rows.extend(copy_rows(args, &*device)?),
            Part::Staging => rows.extend(staging_rows(args, device.clone())?),
            Part::Ipc => rows.extend(ipc_rows(args, &*device)?),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<28} {:>8} {:>6} {:>9}  {:<26} {:>9} {:>6}",
        "part", "what", "block", "blocks", "GB/s", "reference", "GB/s", "ratio"
    );
    for r in &rows {
        println!(
            "{:<8} {:<28} {:>8} {:>6} {:>9.2}  {:<26} {:>9.2} {:>5.0}%",
            r.part,
            r.what,
            units::format_size(r.block_size),
            r.blocks,
            r.gbps,
            r.reference,
            r.reference_gbps,
            100.0 * r.gbps / r.reference_gbps
        );
    }
    Ok(())
}

fn open_device(spec: &str) -> kvferry::Result<Arc<dyn Device>> {
    let unknown = || kvferry::Error::InvalidArgument(format!("unknown device `{spec}` (cuda:N, rocm:N or host)"));
    if spec == "host" {
        return Ok(Arc::new(HostDevice::new()?));
    }
    let (vendor, ordinal) = spec.split_once(':').ok_or_else(unknown)?;
    let ordinal: u32 = ordinal.parse().map_err(|_| unknown())?;
    match vendor {
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Arc::new(kvferry::CudaDevice::open(ordinal)?)),
        #[cfg(feature = "rocm")]
        "rocm" => Ok(Arc::new(kvferry::RocmDevice::open(ordinal)?)),
        _ if ["cuda", "rocm"].contains(&vendor) => Err(kvferry::Error::Unsupported {
            what: format!("{vendor} device {ordinal}"),
            why: format!("this build lacks the `{vendor}` cargo feature"),
        }),
        _ => Err(unknown()),
    }
}

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(60))
}

/// Mean time of `step` over at least `min_time` seconds and three runs, after one warm-up.
fn time_per_run(min_time: f64, mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    step()?;
    let started = Instant::now();
    let mut runs = 0u32;
    while runs < 3 || started.elapsed().as_secs_f64() < min_time {
        step()?;
        runs += 1;
    }
    Ok(started.elapsed() / runs)
}

fn gbps(bytes: usize, per_run: Duration) -> f64 {
    bytes as f64 / per_run.as_secs_f64() / 1e9
}

/// Copy a batch on `device` and wait for it.
fn copy(device: &dyn Device, ops: &[CopyOp]) -> anyhow::Result<()> {
    // SAFETY: every caller builds ops over buffers it owns for the duration of the call.
    unsafe { device.copy_batch(ops) }?.wait(deadline())?;
    Ok(())
}

fn pinned_host(device: &dyn Device, len: usize) -> anyhow::Result<(HostBuffer, Option<kvferry::memory::PinGuard>)> {
    let buffer = HostBuffer::alloc(len, &HostAllocOptions::new())?;
    let pin = match device.kind() {
        kvferry::MemKind::Host => None,
        _ => Some(device.pin_host(buffer.region())?),
    };
    Ok((buffer, pin))
}

fn copy_rows(args: &GpuBenchArgs, device: &dyn Device) -> anyhow::Result<Vec<GpuRow>> {
    let n = args.blocks;
    let (host, _pin) = pinned_host(device, args.block_sizes.iter().max().copied().unwrap_or(0) as usize * n)?;
    host.fill(0x5a);
    let mut rows = Vec::new();
    for &block in &args.block_sizes {
        let total = block as usize * n;
        // Blocks land in every other slot of the device buffer, as a paged cache scatters them.
        let dev = device.alloc(total * 2)?;
        let (h, d) = (host.as_ptr() as u64, dev.region().addr);
        let h2d: Vec<CopyOp> =
            (0..n as u64).map(|i| CopyOp { src: h + i * block, dst: d + 2 * i * block, len: block }).collect();
        let d2h: Vec<CopyOp> = h2d.iter().map(|o| CopyOp { src: o.dst, dst: o.src, len: o.len }).collect();
        let whole_h2d = [CopyOp { src: h, dst: d, len: total as u64 }];
        let whole_d2h = [CopyOp { src: d, dst: h, len: total as u64 }];
        let torch = torch_pinned_copy(&args.device, total);
        for (what, batched, whole, torch_gbps) in [
            ("batched H2D", &h2d, &whole_h2d, torch.map(|t| t.0)),
            ("batched D2H", &d2h, &whole_d2h, torch.map(|t| t.1)),
        ] {
            let batched_gbps = gbps(total, time_per_run(args.min_time, || copy(device, batched))?);
            let whole_gbps = gbps(total, time_per_run(args.min_time, || copy(device, whole))?);
            rows.push(row("copy", what.into(), block, n, batched_gbps, "one contiguous copy", whole_gbps));
            if let Some(t) = torch_gbps {
                rows.push(row("copy", what.into(), block, n, batched_gbps, "torch pinned .to()", t));
            }
        }
    }
    Ok(rows)
}

fn row(
    part: &'static str,
    what: String,
    block: u64,
    blocks: usize,
    gbps: f64,
    reference: &'static str,
    reference_gbps: f64,
) -> GpuRow {
    GpuRow { part, what, block_size: block, blocks, gbps, reference, reference_gbps }
}

/// torch's pinned host ↔ device copy of `total` bytes, (H2D, D2H) in GB/s; `None` (and a note)
/// where Python or torch is missing or the device is not a CUDA one.
fn torch_pinned_copy(device: &str, total: usize) -> Option<(f64, f64)> {
    let ordinal = device.strip_prefix("cuda:")?;
    let script = format!(
        "import torch,time\n\
         h=torch.empty({total},dtype=torch.uint8).pin_memory(); d=torch.empty({total},dtype=torch.uint8,device='cuda:{ordinal}')\n\
         def bw(f):\n  f(); torch.cuda.synchronize(); n=0; t=time.perf_counter()\n  \
         while n<3 or time.perf_counter()-t<0.5:\n    f(); torch.cuda.synchronize(); n+=1\n  \
         return {total}*n/(time.perf_counter()-t)/1e9\n\
         print(bw(lambda: d.copy_(h,non_blocking=True)), bw(lambda: h.copy_(d,non_blocking=True)))\n"
    );
    let out = Command::new("python3").args(["-c", &script]).output();
    let parsed = out.ok().filter(|o| o.status.success()).and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
        Some((it.next()??, it.next()??))
    });
    if parsed.is_none() {
        eprintln!("note: no torch reference (python3 with torch and CUDA not found)");
    }
    parsed
}

/// Scattered blocks in `r`: block i at slot 2i.
fn block_regions(r: MemRegion, block: u64, n: usize) -> Vec<MemRegion> {
    (0..n as u64).map(|i| MemRegion { addr: r.addr + 2 * i * block, len: block, kind: r.kind }).collect()
}

/// WRITE blocks `all` of `local` to the same blocks of `remote` and wait.
fn write_blocks(agent: &Agent, local: &LocalDescs, remote: &RemoteDescs, all: &[usize]) -> anyhow::Result<()> {
    agent.write(local, all, remote, all, deadline())?.wait()?;
    Ok(())
}

/// Two agents in this process; `memory` makes each side's buffer.
fn agent_pair(
    name: &str,
    staging: Option<StagingConfig>,
    memory: impl Fn() -> anyhow::Result<Arc<dyn Memory>>,
    block: u64,
    n: usize,
) -> anyhow::Result<(Agent, Agent, LocalDescs, RemoteDescs, Vec<kvferry::Registration>)> {
    let config = |side: &str| AgentConfig { staging: staging.clone(), ..AgentConfig::new(format!("{name}-{side}")) };
    let (initiator, target) = (Agent::new(config("initiator"))?, Agent::new(config("target"))?);
    let (a, b) = (memory()?, memory()?);
    let regs = vec![initiator.register(a.clone())?, target.register(b.clone())?];
    let peer = initiator.add_peer(&target.metadata())?;
    let local = initiator.prepare_local(&block_regions(a.region(), block, n))?;
    let remote = initiator.prepare_remote(&peer, &block_regions(b.region(), block, n))?;
    Ok((initiator, target, local, remote, regs))
}

fn staging_rows(args: &GpuBenchArgs, device: Arc<dyn Device>) -> anyhow::Result<Vec<GpuRow>> {
    let n = args.blocks;
    let mut rows = Vec::new();
    let host_device: Arc<dyn Device> = Arc::new(HostDevice::new()?);
    let stage_host = device.kind() == kvferry::MemKind::Host;
    let staging = StagingConfig { stage_host, ..StagingConfig::new(vec![device.clone()]) };
    let all: Vec<usize> = (0..n).collect();
    for &block in &args.block_sizes {
        let total = block as usize * n;
        let staged = agent_pair("staged", Some(staging.clone()), || Ok(device.alloc(total * 2)?), block, n)?;
        let direct = agent_pair("direct", None, || Ok(host_device.alloc(total * 2)?), block, n)?;
        let staged_gbps =
            gbps(total, time_per_run(args.min_time, || write_blocks(&staged.0, &staged.2, &staged.3, &all))?);
        let direct_gbps =
            gbps(total, time_per_run(args.min_time, || write_blocks(&direct.0, &direct.2, &direct.3, &all))?);
        let what = format!("{0}→TCP→{0} staged WRITE", device.name());
        rows.push(row("staging", what, block, n, staged_gbps, "host→TCP→host (zero-copy)", direct_gbps));
    }
    Ok(rows)
}

/// The `ipc` part's peer process: owns device memory, serves its side channel, prints the address
/// and stays until its stdin closes.
fn ipc_owner(args: &GpuBenchArgs, len: usize) -> anyhow::Result<()> {
    let agent = ipc_agent(&args.device, "gpu-bench-owner")?;
    let device = open_device(&args.device)?;
    let memory = device.alloc(len * 2)?;
    let _reg = agent.register(memory)?;
    let addr = agent.serve_side_channel("127.0.0.1:0".parse()?)?;
    println!("side-channel {addr}");
    std::io::stdout().flush()?;
    // Returns at EOF, when the measuring process is done.
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn ipc_agent(device: &str, name: &str) -> anyhow::Result<Agent> {
    let ordinal = device.strip_prefix("cuda:").context("the ipc part needs a cuda:N device")?.parse()?;
    let device = kvferry::CudaDevice::open(ordinal)?;
    let ipc = kvferry::transport::cuda_ipc::CudaIpcConfig { device };
    Ok(Agent::new(AgentConfig { cuda_ipc: Some(ipc), ..AgentConfig::new(name) })?)
}

#[cfg(not(feature = "cuda"))]
fn ipc_agent(_device: &str, _name: &str) -> anyhow::Result<Agent> {
    bail!("the ipc part needs the `cuda` cargo feature")
}

fn ipc_rows(args: &GpuBenchArgs, device: &dyn Device) -> anyhow::Result<Vec<GpuRow>> {
    if !args.device.starts_with("cuda:") {
        println!("skipping the ipc part: it needs a cuda:N device");
        return Ok(Vec::new());
    }
    let agent = ipc_agent(&args.device, "gpu-bench")?;
    let mut owner = crate::cli::self_command()?
        .args(["gpu-bench", "--device", &args.device, "--blocks", &args.blocks.to_string(), "--ipc-owner"])
        .arg(format!("--block-sizes={}", args.block_sizes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the ipc peer process")?;
    let mut line = String::new();
    BufReader::new(owner.stdout.take().context("the peer's stdout")?).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("side-channel ") else {
        bail!("the ipc peer process did not start: {line:?}");
    };
    let peer = agent.connect_peer(addr, deadline())?;
    let remote_region = agent.peer_metadata(&peer).context("the peer's metadata")?.regions[0].region;
    let n = args.blocks;
    let all: Vec<usize> = (0..n).collect();
    let mut rows = Vec::new();
    for &block in &args.block_sizes {
        let total = block as usize * n;
        let local_mem = device.alloc(total * 2)?;
        let _reg = agent.register(local_mem.clone())?;
        let local_blocks = block_regions(local_mem.region(), block, n);
        let local = agent.prepare_local(&local_blocks)?;
        let remote = agent.prepare_remote(&peer, &block_regions(remote_region, block, n))?;
        let read = gbps(
            total,
            time_per_run(args.min_time, || Ok(agent.read(&local, &all, &remote, &all, deadline())?.wait()?))?,
        );
        let write = gbps(total, time_per_run(args.min_time, || write_blocks(&agent, &local, &remote, &all))?);
        // The same scattered blocks copied D2D inside this process.
        let scratch = device.alloc(total * 2)?;
        let ops: Vec<CopyOp> = local_blocks
            .iter()
            .zip(block_regions(scratch.region(), block, n))
            .map(|(s, d)| CopyOp { src: s.addr, dst: d.addr, len: block })
            .collect();
        let local_d2d = gbps(total, time_per_run(args.min_time, || copy(device, &ops))?);
        rows.push(row("ipc", "cuda-ipc READ".into(), block, n, read, "D2D in one process", local_d2d));
        rows.push(row("ipc", "cuda-ipc WRITE".into(), block, n, write, "D2D in one process", local_d2d));
    }
    drop(owner.stdin.take());
    owner.wait()?;
    Ok(rows)
}
