//! `kvferry bench`: transport bandwidth and latency over a sweep of block and batch sizes, in the
//! spirit of nixlbench. By default both ends run in this process over TCP loopback.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kvferry::memory::host::HostBuffer;
use kvferry::transport::shm::ShmConfig;
use kvferry::transport::tcp::TcpConfig;
use kvferry::{Agent, Deadline, LocalDescs, MemKind, MemRegion, Op, RemoteDescs, TransferRequest};
use serde::Serialize;

use crate::serve::{self, FabricArgs, MemoryArg, OptionArgs, ServeArgs, Target, TlsArgs};
use crate::tier_bench::{self, TierBenchArgs};
use crate::{pattern, units};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpArg {
    Read,
    Write,
    Both,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Both ends in this process, over loopback.
    Loopback,
    /// Host the buffer and wait for initiators (same as `kvferry serve`).
    Target,
    /// Drive transfers against `--peer`.
    Initiator,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchWhat {
    /// Put and get throughput of the tier store's DRAM and disk tiers, next to memcpy, and of its
    /// remote tier, next to the object store client's raw put and get loop.
    Tier(Box<TierBenchArgs>),
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Something other than a transport to measure.
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// Transport to measure (`kvferry info` lists those in this build), or `memcpy` for the
    /// machine's single-thread copy limit measured the same way. `shm` falls back to TCP for a peer
    /// it cannot reach; the `path` column shows what moved the bytes.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// What backs the buffers: `shared` (memfd, which shm maps: the target's for READs, the
    /// initiator's for the owner's pull of WRITEs) or `private` (anonymous memory, which shm
    /// reaches by cross-memory attach). The initiator's, and the target's in loopback mode.
    #[arg(long, value_enum, default_value = "shared")]
    pub memory: MemoryArg,
    #[arg(long, value_enum, default_value = "both")]
    pub op: OpArg,
    /// Block sizes to sweep.
    #[arg(long, default_value = "4K,16K,64K,256K,1M,4M,16M,64M", value_parser = units::parse_size_list)]
    pub block_sizes: std::vec::Vec<u64>,
    /// Blocks per transfer to sweep.
    #[arg(long, default_value = "1,16,64", value_parser = units::parse_count_list)]
    pub batch_sizes: std::vec::Vec<usize>,
    /// Skip combinations moving more than this per transfer.
    #[arg(long, default_value = "1G", value_parser = units::parse_size)]
    pub max_transfer: u64,
    /// Seconds to spend on each row (after one warm-up transfer).
    #[arg(long, default_value_t = 0.25)]
    pub min_time: f64,
    #[arg(long, default_value_t = 3)]
    pub min_iters: usize,
    #[arg(long, default_value_t = 100_000)]
    pub max_iters: usize,
    /// TCP streams per peer.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Pool threads copying shm batches of 1 MiB or more, next to the link's own (default: one per
    /// core but one).
    #[arg(long)]
    pub copy_threads: Option<usize>,
    /// Verify every byte of every row (outside the timed loop).
    #[arg(long)]
    pub check: bool,
    /// Print one JSON array of rows instead of the table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "loopback")]
    pub role: Role,
    /// The target's side channel (`host:port`), for `--role initiator`.
    #[arg(long)]
    pub peer: Option<String>,
    /// Side channel address, for `--role target`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Host peers dial when `--listen` is a wildcard address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Deadline of each transfer, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub deadline: f64,
    #[command(flatten)]
    pub fabric: FabricArgs,
    /// Serve the initiator's Prometheus metrics at `http://ADDR/metrics` while the bench runs.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub options: OptionArgs,
    /// Keep the metrics endpoint up this many seconds after the last row, for a final scrape.
    #[arg(long, default_value_t = 0.0, requires = "metrics")]
    pub linger: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub transport: String,
    /// What moved the bytes: `tcp`, `shm/mapped`, `shm/cross-memory`, `memcpy`.
    pub path: String,
    /// The libfabric provider, for `--transport fabric`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub op: String,
    pub block_size: u64,
    pub batch: usize,
    pub streams: usize,
    pub iterations: usize,
    pub bytes_per_transfer: u64,
    /// 1e9 bytes per second.
    pub gbps: f64,
    pub lat_avg_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    /// Time `post` takes on the caller's thread.
    pub post_avg_us: f64,
    /// Ops on the wire per transfer after coalescing (equal to `batch`: the bench pairs blocks so
    /// that none coalesce).
    pub wire_ops: usize,
}

/// What moves the bytes: an agent talking to a peer, or plain `memcpy` in this process (the
/// machine's limit, measured the same way).
enum Mover {
    Agent {
        agent: Agent,
        peer: String,
        _registrations: Vec<kvferry::Registration>,
        /// The in-process target, in loopback mode.
        _target: Option<Target>,
    },
    Memcpy {
        _remote: Arc<HostBuffer>,
    },
}

struct Setup {
    mover: Mover,
    /// The libfabric provider the agent uses, for `--transport fabric`.
    provider: Option<String>,
    remote: MemRegion,
    local: Arc<HostBuffer>,
    scratch: Option<Arc<HostBuffer>>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchWhat::Tier(tier)) = &args.what {
        return tier_bench::run(tier);
    }
    if ![
        "tcp",
        "shm",
        "memcpy",
        #[cfg(feature = "fabric")]
        "fabric",
    ]
    .contains(&args.transport.as_str())
    {
        bail!(
            "transport `{}` is not available in this build (`kvferry info` lists the transports; `memcpy` gives the \
             machine's copy limit)",
            args.transport
        );
    }
    let plan = plan(args);
    let needed = plan.iter().map(|&(_, block, batch)| block * batch as u64).max().unwrap_or(0);
    if args.role == Role::Target {
        return serve::run(&serve_args(args, args.max_transfer.max(needed)));
    }
    if plan.is_empty() {
        bail!("no block × batch combination fits --max-transfer {}", units::format_size(args.max_transfer));
    }
    let setup = setup(args, needed)?;
    let metrics = match &setup.mover {
        Mover::Agent { agent, .. } => serve::serve_metrics(agent, args.metrics)?,
        Mover::Memcpy { .. } => None,
    };
    let progress = if args.json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(plan.len() as u64)
            .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"))
    };
    let mut rows = Vec::with_capacity(plan.len());
    let mut last_op = None;
    for (i, &(op, block, batch)) in plan.iter().enumerate() {
        progress.set_message(format!("{op} {} × {batch}", units::format_size(block)));
        let row = run_row(args, &setup, op, block, batch, i as u64)?;
        if !args.json {
            let header = (last_op != Some(op)).then(|| table_header(args, &setup, &row));
            last_op = Some(op);
            // `suspend` rather than `println`: a hidden bar (no terminal) would swallow the lines.
            progress.suspend(|| {
                header.iter().for_each(|h| println!("{h}"));
                println!("{}", table_line(&row));
            });
        }
        rows.push(row);
        progress.inc(1);
    }
    progress.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    if metrics.is_some() && args.linger > 0.0 {
        std::io::Write::flush(&mut std::io::stdout())?;
        std::thread::sleep(Duration::from_secs_f64(args.linger));
    }
    Ok(())
}

/// Every (op, block, batch) to run, reads first.
fn plan(args: &BenchArgs) -> Vec<(Op, u64, usize)> {
    let ops: &[Op] = match args.op {
        OpArg::Read => &[Op::Read],
        OpArg::Write => &[Op::Write],
        OpArg::Both => &[Op::Read, Op::Write],
    };
    let mut plan = Vec::new();
    for &op in ops {
        for &block in &args.block_sizes {
            for &batch in &args.batch_sizes {
                if block.saturating_mul(batch as u64) <= args.max_transfer {
                    plan.push((op, block, batch));
                }
            }
        }
    }
    plan
}

/// The target this bench's flags describe, holding `buffer_size` bytes.
fn serve_args(args: &BenchArgs, buffer_size: u64) -> ServeArgs {
    ServeArgs {
        listen: args.listen,
        advertise: args.advertise.clone(),
        buffer_size,
        fill_seed: None,
        streams: args.streams,
        duration: None,
        name: None,
        memory: args.memory,
        transport: args.transport.clone(),
        fabric: args.fabric.clone(),
        metrics: args.metrics,
        etcd: Default::default(),
        limits: Default::default(),
        tls: args.tls.clone(),
        options: args.options.clone(),
    }
}

fn setup(args: &BenchArgs, needed: u64) -> anyhow::Result<Setup> {
    let shared = args.memory == MemoryArg::Shared;
    let local = serve::alloc_buffer(needed, shared)?;
    let scratch = args.check.then(|| serve::alloc_buffer(needed, shared)).transpose()?;
    if args.transport == "memcpy" {
        let remote = serve::alloc_buffer(needed, false)?;
        let mover = Mover::Memcpy { _remote: remote.clone() };
        return Ok(Setup { remote: remote.region(), mover, provider: None, local, scratch });
    }
    let (target, peer_addr) = match args.role {
        Role::Loopback => {
            let target = Target::start(&ServeArgs {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
                name: Some("kvferry-bench-target".into()),
                ..serve_args(args, needed)
            })?;
            let addr = target.side_channel.to_string();
            (Some(target), addr)
        }
        _ => (None, args.peer.clone().context("--role initiator needs --peer host:port")?),
    };
    let tcp = TcpConfig { streams: args.streams, ..TcpConfig::default() };
    let name = format!("kvferry-bench-{}", std::process::id());
    let mut config = serve::agent_config(name, &args.transport, tcp, &args.fabric)?;
    config.tls = args.tls.config();
    // Only `--transport shm` measures shared memory; otherwise a peer on this host would take it.
    config.shm =
        (args.transport == "shm").then(|| ShmConfig { copy_threads: args.copy_threads, ..ShmConfig::default() });
    let agent = Agent::new(args.options.apply(config)?)?;
    let peer = agent
        .connect_peer(&peer_addr, Deadline::after(Duration::from_secs(10)))
        .with_context(|| format!("connecting to {peer_addr}"))?;
    let meta = agent.peer_metadata(&peer).context("peer vanished")?;
    let remote = meta
        .regions
        .iter()
        .map(|r| r.region)
        .filter(|r| r.kind == MemKind::Host)
        .max_by_key(|r| r.len)
        .context("the peer registered no host memory")?;
    if remote.len < needed {
        bail!("the peer's buffer holds {} bytes; this sweep needs {needed}", remote.len);
    }
    let registrations =
        std::iter::once(&local).chain(&scratch).map(|b| agent.register(b.clone())).collect::<Result<Vec<_>, _>>()?;
    // The fabric endpoint reads `provider|addresses`.
    let provider = agent
        .endpoints()
        .iter()
        .find(|e| e.kind.name() == "fabric")
        .and_then(|e| e.address.split('|').next().map(str::to_string));
    Ok(Setup {
        mover: Mover::Agent { agent, peer, _registrations: registrations, _target: target },
        provider,
        remote,
        local,
        scratch,
    })
}

/// One transfer's figures: time spent posting, ops on the wire, and what moved the bytes.
struct Moved {
    post: Duration,
    ops: usize,
    path: String,
}

/// The block pairs of one row. Block `i` of the local buffer pairs with block `batch - 1 - i` of
/// the remote one, so that no two pairs coalesce and a batch really moves `batch` separate blocks.
enum Pairs {
    Agent { local: LocalDescs, remote: RemoteDescs, indices: Vec<usize> },
    Memcpy { local: u64, remote: u64, block: u64, batch: u64 },
}

impl Pairs {
    fn new(setup: &Setup, buf: &HostBuffer, block: u64, batch: usize) -> anyhow::Result<Pairs> {
        let (local_base, remote_base) = (buf.as_ptr() as u64, setup.remote.addr);
        let Mover::Agent { agent, peer, .. } = &setup.mover else {
            return Ok(Pairs::Memcpy { local: local_base, remote: remote_base, block, batch: batch as u64 });
        };
        let n = batch as u64;
        let local: Vec<MemRegion> =
            (0..n).map(|i| MemRegion { addr: local_base + i * block, len: block, kind: MemKind::Host }).collect();
        let remote: Vec<MemRegion> = (0..n)
            .map(|i| MemRegion { addr: remote_base + (n - 1 - i) * block, len: block, kind: MemKind::Host })
            .collect();
        Ok(Pairs::Agent {
            local: agent.prepare_local(&local)?,
            remote: agent.prepare_remote(peer, &remote)?,
            indices: (0..batch).collect(),
        })
    }

    /// Move the row's blocks once.
    fn transfer(&self, args: &BenchArgs, setup: &Setup, op: Op) -> anyhow::Result<Moved> {
        match self {
            Pairs::Agent { local, remote, indices } => {
                let Mover::Agent { agent, .. } = &setup.mover else { unreachable!("agent pairs come from an agent") };
                let deadline = Deadline::after(Duration::from_secs_f64(args.deadline));
                let xfer = agent.post(TransferRequest::new(op, (local, indices), (remote, indices), deadline))?;
                xfer.wait()?;
                let path = match xfer.mode() {
                    Some(mode) => format!("{}/{mode}", xfer.transport()),
                    None => xfer.transport().to_string(),
                };
                Ok(Moved { post: xfer.post_time(), ops: xfer.ops(), path })
            }
            &Pairs::Memcpy { local, remote, block, batch } => {
                for i in 0..batch {
                    let (l, r) = (local + i * block, remote + (batch - 1 - i) * block);
                    let (src, dst) = if op == Op::Read { (r, l) } else { (l, r) };
                    // Both buffers are this process's own, sized for the sweep.
                    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, block as usize) };
                }
                Ok(Moved { post: Duration::ZERO, ops: batch as usize, path: "memcpy".into() })
            }
        }
    }
}

fn run_row(args: &BenchArgs, setup: &Setup, op: Op, block: u64, batch: usize, row: u64) -> anyhow::Result<Row> {
    let pairs = Pairs::new(setup, &setup.local, block, batch)?;
    let bytes = block * batch as u64;
    let seed = 0x6b76_6665_7272_7900 + row;
    let check = setup.scratch.as_ref().map(|s| Pairs::new(setup, s, block, batch).map(|p| (s, p))).transpose()?;
    if let Some((scratch, scratch_pairs)) = &check {
        // Untimed set-up of known data: for a read, the remote blocks hold the pattern (written
        // there from the scratch buffer); for a write, the local blocks do.
        let seeded = if op == Op::Read { scratch } else { &setup.local };
        // No transfer is in flight on these buffers while the bench fills them.
        pattern::fill(unsafe { &mut seeded.as_mut_slice()[..bytes as usize] }, seed, 0);
        if op == Op::Read {
            scratch_pairs.transfer(args, setup, Op::Write)?;
            unsafe { setup.local.as_mut_slice()[..bytes as usize].fill(0) };
        }
    }

    let path = pairs.transfer(args, setup, op)?.path; // warm-up: connections, mappings, caches
    let mut latencies = Vec::new();
    let mut post_total = Duration::ZERO;
    let mut wire_ops = 0;
    let started = Instant::now();
    while latencies.len() < args.max_iters
        && (latencies.len() < args.min_iters || started.elapsed().as_secs_f64() < args.min_time)
    {
        let t0 = Instant::now();
        let moved = pairs.transfer(args, setup, op)?;
        latencies.push(t0.elapsed());
        post_total += moved.post;
        wire_ops = moved.ops;
    }
    let total = started.elapsed();

    if let Some((scratch, scratch_pairs)) = &check {
        let (verified, what) = match op {
            Op::Read => (&setup.local, "read"),
            _ => {
                scratch_pairs.transfer(args, setup, Op::Read)?;
                (*scratch, "written")
            }
        };
        let data = unsafe { &verified.as_slice()[..bytes as usize] };
        if let Some(at) = pattern::first_mismatch(data, seed, 0) {
            bail!("check failed: {what} data differs at byte {at} ({op}, block {block}, batch {batch})");
        }
    }

    latencies.sort();
    let n = latencies.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p = |q: f64| us(latencies[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
    Ok(Row {
        transport: args.transport.clone(),
        path,
        provider: setup.provider.clone(),
        op: op.to_string(),
        block_size: block,
        batch,
        streams: args.streams,
        iterations: n,
        bytes_per_transfer: bytes,
        gbps: (bytes as f64 * n as f64) / total.as_secs_f64() / 1e9,
        lat_avg_us: us(latencies.iter().sum::<Duration>()) / n as f64,
        lat_p50_us: p(0.50),
        lat_p99_us: p(0.99),
        post_avg_us: us(post_total) / n as f64,
        wire_ops,
    })
}

fn table_header(args: &BenchArgs, setup: &Setup, row: &Row) -> String {
    let streams = match row.path.as_str() {
        "tcp" => format!("{} stream(s), ", args.streams),
        "fabric" => format!("provider {}, {} rail(s), ", setup.provider.as_deref().unwrap_or("?"), args.fabric.rails),
        _ => String::new(),
    };
    let mode = match args.role {
        _ if args.transport == "memcpy" => "single-thread copy in this process".to_string(),
        Role::Loopback => format!("{streams}in-process loopback"),
        _ => format!("{streams}peer {}", args.peer.as_deref().unwrap_or("?")),
    };
    format!(
        "\n{} {} via {}, {mode}\n{:>14} {:>10} {:>14} {:>14} {:>14} {:>14} {:>8}\n{}",
        args.transport.to_uppercase(),
        row.op.to_uppercase(),
        row.path,
        "Block Size (B)",
        "Batch Size",
        "B/W (GB/Sec)",
        "Avg Lat. (us)",
        "P99 Lat. (us)",
        "Avg Post (us)",
        "Iters",
        "-".repeat(94)
    )
}

fn table_line(r: &Row) -> String {
    format!(
        "{:>14} {:>10} {:>14.3} {:>14.1} {:>14.1} {:>14.2} {:>8}",
        r.block_size, r.batch, r.gbps, r.lat_avg_us, r.lat_p99_us, r.post_avg_us, r.iterations
    )
}
