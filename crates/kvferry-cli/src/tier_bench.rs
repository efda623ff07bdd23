//! `kvferry bench tier`: put and get throughput of the tier store's DRAM and disk tiers, next to a
//! single-thread memcpy of the same bytes measured in the same run, and of its remote tier, next to
//! the same object store client's raw put and get loop (`tier_bench/remote.rs`).
//!
//! Host rows: blocks are put into a DRAM-only store from a host buffer and read back out. Disk rows:
//! a store with one worker (one ring, so `--queue-depths` is the number of i/os in flight, as fio's
//! `--iodepth`) takes the blocks into DRAM untimed, then `offload` writes them all down (disk put)
//! and `get` reads them back, verifying checksums and promoting them (disk get).

mod remote;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvferry::memory::host::HostBuffer;
use kvferry::tier::{BlockKey, BlockRegions, DiskConfig, TierConfig, TierStore};
use kvferry::{CopyFence, Deadline, Device, HostAllocOptions, HostDevice, MemRegion};
use serde::Serialize;

use crate::units;

#[derive(clap::Args, Debug, Clone)]
pub struct TierBenchArgs {
    /// Directory for the disk tier's files (default: a fresh one under the system's temp dir);
    /// removed afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Block sizes [default: 64K,256K,1M for the host and disk tiers, 256K,1M,4M for the remote tier]
    #[arg(long, value_parser = units::parse_size_list)]
    pub block_sizes: Option<std::vec::Vec<u64>>,
    /// Tiers to measure.
    #[arg(long, visible_alias = "tier", value_enum, value_delimiter = ',', default_value = "host,disk")]
    pub tiers: Vec<TierArg>,
    /// Disk i/os in flight.
    #[arg(long, default_value = "1,8,32", value_parser = units::parse_count_list)]
    pub queue_depths: std::vec::Vec<usize>,
    /// Bytes moved by each measurement (also the size of each tier) [default: 512M, 256M for the
    /// remote tier]
    #[arg(long, value_parser = units::parse_size)]
    pub bytes: Option<u64>,
    /// The remote tier's object store: `s3://bucket/prefix` (credentials, region and endpoint from
    /// the `AWS_*` environment variables, as a store takes them) or `file:///dir`.
    #[arg(long, conflicts_with = "remote_path")]
    pub remote_url: Option<String>,
    /// A shared directory for the remote tier (default: a fresh one under the system's temp dir,
    /// removed afterwards). The bench deletes the objects it wrote from either.
    #[arg(long)]
    pub remote_path: Option<PathBuf>,
    /// Requests in flight to the remote tier, for the store and the raw loop alike.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Blocks per `put` / `get` call of the host and remote rows.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Blocks per `get` call of the disk rows: many times the queue depth, so that the ring stays
    /// full as fio's does rather than draining at the end of every call.
    #[arg(long, default_value_t = 1024)]
    pub disk_batch: usize,
    /// Measurements per row; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON array of rows instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierArg {
    Host,
    Disk,
    Remote,
}

#[derive(Debug, Clone, Serialize)]
pub struct TierRow {
    pub tier: &'static str,
    pub op: &'static str,
    pub block_size: u64,
    /// Disk rows only.
    pub queue_depth: Option<usize>,
    pub gbps: f64,
    /// The single-thread memcpy of the same bytes, same run (host rows).
    pub memcpy_gbps: Option<f64>,
    /// Requests in flight (remote rows).
    pub concurrency: Option<usize>,
    /// The same object store client's raw put or get loop over the same objects, same run (remote
    /// rows).
    pub raw_gbps: Option<f64>,
}

const DEADLINE: Duration = Duration::from_secs(600);
/// The bench's buffers and arenas: faulted in up front, so that no measurement pays for page faults.
const ALLOC: HostAllocOptions = HostAllocOptions::new().with_pin(false).with_populate(true);

const LOCAL_BLOCK_SIZES: [u64; 3] = [64 << 10, 256 << 10, 1 << 20];
const LOCAL_BYTES: u64 = 512 << 20;

pub fn run(args: &TierBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.repeats > 0 && args.batch > 0 && args.disk_batch > 0 && args.concurrency > 0,
        "--repeats, --batch, --disk-batch and --concurrency must be positive"
    );
    let remote = args.tiers.contains(&TierArg::Remote);
    anyhow::ensure!(
        remote || (args.remote_url.is_none() && args.remote_path.is_none()),
        "--remote-url and --remote-path go with --tiers remote"
    );
    let mut rows = Vec::new();
    if args.tiers.iter().any(|t| *t != TierArg::Remote) {
        let dir = match &args.dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("kvferry-tier-bench-{}", std::process::id())),
        };
        let block_sizes = args.block_sizes.clone().unwrap_or(LOCAL_BLOCK_SIZES.to_vec());
        let result = run_in(args, &dir, &block_sizes, args.bytes.unwrap_or(LOCAL_BYTES));
        let _ = std::fs::remove_dir_all(&dir);
        rows = result?;
    }
    if remote {
        rows.extend(remote::rows(args)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let (remote_rows, local_rows): (Vec<&TierRow>, Vec<&TierRow>) = rows.iter().partition(|r| r.tier == "remote");
    if !local_rows.is_empty() {
        println!("| tier | op | block | queue depth | GB/s | memcpy GB/s | % of memcpy |");
        println!("|---|---|---|---|---|---|---|");
        for r in local_rows {
            let qd = r.queue_depth.map_or("-".into(), |q| q.to_string());
            let (memcpy, ratio) = limit_columns(r.gbps, r.memcpy_gbps);
            println!(
                "| {} | {} | {} | {qd} | {:.2} | {memcpy} | {ratio} |",
                r.tier,
                r.op,
                units::format_size(r.block_size),
                r.gbps
            );
        }
    }
    if !remote_rows.is_empty() {
        println!("| tier | op | block | concurrency | GB/s | raw object_store GB/s | % of raw |");
        println!("|---|---|---|---|---|---|---|");
        for r in remote_rows {
            let concurrency = r.concurrency.map_or("-".into(), |c| c.to_string());
            let (raw, ratio) = limit_columns(r.gbps, r.raw_gbps);
            println!(
                "| {} | {} | {} | {concurrency} | {:.2} | {raw} | {ratio} |",
                r.tier,
                r.op,
                units::format_size(r.block_size),
                r.gbps
            );
        }
    }
    Ok(())
}

/// A limit's column and the row's share of it.
fn limit_columns(gbps: f64, limit: Option<f64>) -> (String, String) {
    match limit {
        Some(limit) => (format!("{limit:.2}"), format!("{:.0}%", 100.0 * gbps / limit)),
        None => ("-".into(), "-".into()),
    }
}

fn run_in(
    args: &TierBenchArgs,
    dir: &std::path::Path,
    block_sizes: &[u64],
    bytes: u64,
) -> anyhow::Result<Vec<TierRow>> {
    let device: Arc<dyn Device> = Arc::new(HostDevice::new()?);
    let mut rows = Vec::new();
    for &block in block_sizes {
        let count = (bytes / block).max(1) as usize;
        let total = count as u64 * block;
        let buffer = |byte: u8| -> anyhow::Result<HostBuffer> {
            let buf = HostBuffer::alloc(total as usize, &ALLOC)?;
            buf.fill(byte);
            Ok(buf)
        };
        let (src, dst) = (buffer(0x5a)?, buffer(0)?);
        // SAFETY: nothing else uses the buffer yet.
        crate::pattern::fill(unsafe { src.as_mut_slice() }, block, 0);
        let keys: Vec<BlockKey> =
            (0..count as u32).map(|i| BlockKey::chain(None, &[i, block as u32], b"bench")).collect();
        let (sources, destinations) = (block_regions(&keys, &src, block), block_regions(&keys, &dst, block));
        let gbps = |elapsed: Duration| total as f64 / elapsed.as_secs_f64() / 1e9;

        if args.tiers.contains(&TierArg::Host) {
            rows.extend(host_rows(args, &device, block, (&src, &dst), (&sources, &destinations))?);
        }
        if !args.tiers.contains(&TierArg::Disk) {
            continue;
        }
        for &depth in &args.queue_depths {
            let _ = std::fs::remove_dir_all(dir);
            let disk = DiskConfig::new(dir, total).with_queue_depth(depth).with_admit_after(0);
            let config = TierConfig::new(block as usize, total).with_host_alloc(ALLOC).with_workers(1).with_disk(disk);
            let store = TierStore::open(config).context("opening the disk tier")?;
            let (mut puts, mut gets) = (Vec::new(), Vec::new());
            // The first pass writes into freshly allocated extents, which costs the file system more
            // than the steady state (fio, too, measures a file it has laid out first): not counted.
            for pass in 0..=args.repeats {
                store.clear()?;
                // SAFETY: as above.
                wait_all(args.batch, &sources, |chunk| unsafe { store.put(Arc::clone(&device), chunk) })?;
                let start = Instant::now();
                store.offload(keys.clone())?.wait(Deadline::after(DEADLINE))?;
                let put = gbps(start.elapsed());
                dst.fill(0);
                let start = Instant::now();
                // SAFETY: as above.
                wait_all(args.disk_batch, &destinations, |chunk| unsafe { store.get(Arc::clone(&device), chunk) })?;
                let get = gbps(start.elapsed());
                if pass > 0 {
                    puts.push(put);
                    gets.push(get);
                }
                check(&dst, block, "disk")?;
            }
            if let Some(reason) = store.stats().io_fallback {
                eprintln!("note: the disk tier ran without registered buffers or files: {reason}");
            }
            for (op, samples) in [("put", puts), ("get", gets)] {
                rows.push(TierRow {
                    tier: "disk",
                    op,
                    block_size: block,
                    queue_depth: Some(depth),
                    gbps: median_of(samples),
                    memcpy_gbps: None,
                    concurrency: None,
                    raw_gbps: None,
                });
            }
        }
    }
    Ok(rows)
}

/// Put and get through a DRAM-only store, and memcpy of the same blocks.
fn host_rows(
    args: &TierBenchArgs,
    device: &Arc<dyn Device>,
    block: u64,
    (src, dst): (&HostBuffer, &HostBuffer),
    (sources, destinations): (&[BlockRegions], &[BlockRegions]),
) -> anyhow::Result<Vec<TierRow>> {
    let total = src.len() as u64;
    let gbps = |elapsed: Duration| total as f64 / elapsed.as_secs_f64() / 1e9;
    let mut rows = Vec::new();
    let memcpy = median(args.repeats, || {
        let start = Instant::now();
        for at in (0..total as usize).step_by(block as usize) {
            // SAFETY: both buffers are `total` bytes long and distinct.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(at), dst.as_ptr().add(at), block as usize) };
        }
        Ok(gbps(start.elapsed()))
    })?;

    let store = TierStore::open(TierConfig::new(block as usize, total).with_host_alloc(ALLOC))?;
    let put = median(args.repeats, || {
        store.clear()?;
        let start = Instant::now();
        // SAFETY: `src` outlives every fence, which are all waited for.
        wait_all(args.batch, sources, |chunk| unsafe { store.put(Arc::clone(device), chunk) })?;
        Ok(gbps(start.elapsed()))
    })?;
    let get = median(args.repeats, || {
        let start = Instant::now();
        // SAFETY: `dst` outlives every fence.
        wait_all(args.batch, destinations, |chunk| unsafe { store.get(Arc::clone(device), chunk) })?;
        Ok(gbps(start.elapsed()))
    })?;
    check(dst, block, "host")?;
    drop(store);
    for (op, gbps) in [("put", put), ("get", get)] {
        rows.push(TierRow {
            tier: "host",
            op,
            block_size: block,
            queue_depth: None,
            gbps,
            memcpy_gbps: Some(memcpy),
            concurrency: None,
            raw_gbps: None,
        });
    }
    Ok(rows)
}

/// Submit every chunk of `batch` blocks, then wait for all of them.
fn wait_all(
    batch: usize,
    blocks: &[BlockRegions],
    mut submit: impl FnMut(Vec<BlockRegions>) -> kvferry::Result<CopyFence>,
) -> anyhow::Result<()> {
    let fences = blocks.chunks(batch).map(|chunk| submit(chunk.to_vec())).collect::<kvferry::Result<Vec<_>>>()?;
    let deadline = Deadline::after(DEADLINE);
    for fence in fences {
        fence.wait(deadline)?;
    }
    Ok(())
}

fn median(repeats: usize, mut measure: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    let samples = (0..repeats).map(|_| measure()).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(median_of(samples))
}

fn median_of(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn check(buf: &HostBuffer, seed: u64, tier: &str) -> anyhow::Result<()> {
    // SAFETY: every fence writing the buffer has completed.
    if let Some(at) = crate::pattern::first_mismatch(unsafe { buf.as_slice() }, seed, 0) {
        bail!("the {tier} tier returned different bytes at offset {at}");
    }
    Ok(())
}

/// Block `i` of `keys` as the `i`-th `block`-byte region of `buf`.
pub(crate) fn block_regions(keys: &[BlockKey], buf: &HostBuffer, block: u64) -> Vec<BlockRegions> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| (*k, vec![MemRegion::host(buf.as_ptr().wrapping_add(i * block as usize), block as usize)]))
        .collect()
}
