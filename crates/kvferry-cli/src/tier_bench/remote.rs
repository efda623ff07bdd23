//! Remote rows: what an engine gets from the remote tier, next to the limit of the client under it.
//!
//! Put: a store with the remote tier takes the blocks into DRAM, which offers each one for upload;
//! timed from the first put to the end of the remote's flush. Get: a second store on the same
//! location and namespace, with an empty DRAM tier, gets every block, which reads them from the
//! remote (verified) into DRAM and copies them out. The limit: the same `object_store` client, built
//! as a store builds it, putting and getting objects of the block size with the same number of
//! requests in flight, on the same runtime shape, alternating with the store's passes, under names
//! of the same shape (the block keys in hex). Each pass writes new bytes (a server that keeps data
//! by its hash would otherwise store nothing the second time) under new names: the store in a
//! namespace of its own, so that it finds none of its blocks already stored, the raw loop in a
//! directory of its own; both delete what they wrote before the next pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kvferry::memory::host::HostBuffer;
use kvferry::tier::{BlockKey, RemoteConfig, RemoteLocation, TierConfig, TierStore};
use kvferry::{Deadline, Device, HostDevice};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{ALLOC, DEADLINE, TierBenchArgs, TierRow, check, median_of, wait_all};

const BLOCK_SIZES: [u64; 3] = [256 << 10, 1 << 20, 4 << 20];
const BYTES: u64 = 256 << 20;
/// Room per block in the upload budget beyond its bytes: each object carries a header and a
/// checksum (tens of bytes), and no block may be dropped for want of budget.
const OBJECT_OVERHEAD: u64 = 4096;

pub(super) fn rows(args: &TierBenchArgs) -> anyhow::Result<Vec<TierRow>> {
    let temp = std::env::temp_dir().join(format!("kvferry-tier-bench-remote-{}", std::process::id()));
    let location = match (&args.remote_url, &args.remote_path) {
        (Some(url), _) => RemoteLocation::Url(url.clone()),
        (None, Some(dir)) => RemoteLocation::Path(dir.clone()),
        (None, None) => RemoteLocation::Path(temp.clone()),
    };
    let result = Raw::open(&location, args.concurrency).and_then(|raw| {
        eprintln!("remote tier at {location}, {} requests in flight", args.concurrency);
        measure(args, &location, &raw)
    });
    if args.remote_url.is_none() && args.remote_path.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

fn measure(args: &TierBenchArgs, location: &RemoteLocation, raw: &Raw) -> anyhow::Result<Vec<TierRow>> {
    let device: Arc<dyn Device> = Arc::new(HostDevice::new()?);
    let block_sizes = args.block_sizes.clone().unwrap_or(BLOCK_SIZES.to_vec());
    let mut rows = Vec::new();
    for block in block_sizes {
        let count = (args.bytes.unwrap_or(BYTES) / block).max(1) as usize;
        let total = count as u64 * block;
        let gbps = |elapsed: Duration| total as f64 / elapsed.as_secs_f64() / 1e9;
        let (src, dst) = (HostBuffer::alloc(total as usize, &ALLOC)?, HostBuffer::alloc(total as usize, &ALLOC)?);
        let keys: Vec<BlockKey> =
            (0..count as u32).map(|i| BlockKey::chain(None, &[i, block as u32], b"bench-remote")).collect();
        // The raw loop's objects are named as the store names its own (the key in hex), so that
        // the server indexes names of the same shape.
        let names: Vec<String> =
            keys.iter().map(|key| key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()).collect();
        let (sources, destinations) =
            (super::block_regions(&keys, &src, block), super::block_regions(&keys, &dst, block));
        let store = |namespace: &str| {
            let remote = RemoteConfig::new(location.clone(), namespace)
                .with_concurrency(args.concurrency)
                .with_max_upload_bytes(total + count as u64 * OBJECT_OVERHEAD);
            let config = TierConfig::new(block as usize, total).with_host_alloc(ALLOC).with_remote(remote);
            TierStore::open(config).with_context(|| format!("opening a store with the remote tier at {location}"))
        };

        let mut samples: [Vec<f64>; 4] = Default::default();
        for pass in 0..args.repeats {
            // New bytes every pass: a server that stores data by its hash (Garage does) would
            // otherwise find a pass's blocks still held from the one before and write nothing.
            let seed = block ^ ((pass as u64 + 1) << 40) ^ u64::from(std::process::id()) << 16;
            // SAFETY: no fence uses `src` between passes.
            crate::pattern::fill(unsafe { src.as_mut_slice() }, seed, 0);
            let objects: Vec<Bytes> =
                unsafe { src.as_slice() }.chunks(block as usize).map(Bytes::copy_from_slice).collect();
            let namespace = format!("kvferry-bench-tier/{}/{block}/{pass}", std::process::id());
            let writer = store(&namespace)?;
            let remote = writer.remote().expect("the store was opened with a remote tier");
            let start = Instant::now();
            // SAFETY: `src` outlives every fence, which are all waited for.
            wait_all(args.batch, &sources, |chunk| unsafe { writer.put(Arc::clone(&device), chunk) })?;
            let flushed = remote.flush(Deadline::after(DEADLINE));
            samples[0].push(gbps(start.elapsed()));
            let stats = remote.stats();
            ensure!(
                flushed && stats.uploads == count as u64,
                "the remote tier at {location} stored {} of {count} blocks ({} dropped, {} failed requests{})",
                stats.uploads,
                stats.dropped,
                stats.errors,
                stats.last_error.map(|e| format!("; last: {e}")).unwrap_or_default()
            );
            drop(writer);

            let reader = store(&namespace)?;
            dst.fill(0);
            let start = Instant::now();
            // SAFETY: `dst` outlives every fence.
            wait_all(args.batch, &destinations, |chunk| unsafe { reader.get(Arc::clone(&device), chunk) })?;
            samples[1].push(gbps(start.elapsed()));
            check(&dst, seed, "remote")?;
            let fingerprint = reader.remote().expect("opened with a remote tier").fingerprint();
            drop(reader);
            raw.delete_under(&raw.prefix.clone().join(fingerprint))?;

            // Fresh names, as the store's are: writing new objects costs more than replacing them.
            let raw_dir = [std::process::id() as u64, block, pass as u64]
                .iter()
                .fold(raw.prefix.clone().join("kvferry-bench-raw"), |dir, part| dir.join(part.to_string()));
            samples[2].push(gbps(raw.put_all(&raw_dir, &names, &objects)?));
            let (elapsed, fetched) = raw.get_all(&raw_dir, &names)?;
            samples[3].push(gbps(elapsed));
            raw.delete_under(&raw_dir)?;
            if let Some(i) = fetched.iter().zip(&objects).position(|(got, put)| got != put) {
                bail!("the raw client read back different bytes for object {i}");
            }
        }
        let [put, get, raw_put, raw_get] = samples.map(median_of);
        for (op, gbps, raw_gbps) in [("put", put, raw_put), ("get", get, raw_get)] {
            rows.push(TierRow {
                tier: "remote",
                op,
                block_size: block,
                queue_depth: None,
                gbps,
                memcpy_gbps: None,
                concurrency: Some(args.concurrency),
                raw_gbps: Some(raw_gbps),
            });
        }
    }
    Ok(rows)
}

/// The client a store builds for `location`, driven directly.
struct Raw {
    store: Arc<dyn ObjectStore>,
    /// Where a store's objects go under the client's root (an `s3://` URL's path).
    prefix: ObjectPath,
    /// Shaped as the remote tier's: two workers, up to 16 threads for file i/o.
    runtime: tokio::runtime::Runtime,
    concurrency: usize,
}

impl Raw {
    fn open(location: &RemoteLocation, concurrency: usize) -> anyhow::Result<Raw> {
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = match location {
            RemoteLocation::Path(dir) => (local(dir)?, ObjectPath::default()),
            RemoteLocation::Url(url) => {
                let parsed = url::Url::parse(url).with_context(|| format!("--remote-url {url:?}"))?;
                match parsed.scheme() {
                    "s3" | "s3a" => {
                        let s3 = object_store::aws::AmazonS3Builder::from_env().with_url(url.clone()).build()?;
                        let prefix = ObjectPath::parse(parsed.path().trim_matches('/'))?;
                        (Arc::new(s3), prefix)
                    }
                    "file" => {
                        let dir: PathBuf =
                            parsed.to_file_path().map_err(|()| anyhow::anyhow!("{url:?} names no local directory"))?;
                        (local(&dir)?, ObjectPath::default())
                    }
                    other => bail!("the remote tier takes s3:// or file:// URLs (or --remote-path), not {other}://"),
                }
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("kvferry-bench-raw")
            .enable_all()
            .build()?;
        Ok(Raw { store, prefix, runtime, concurrency })
    }

    /// Put `objects` as `dir/<name>`, in order; the time from the first put to the last one's end.
    fn put_all(&self, dir: &ObjectPath, names: &[String], objects: &[Bytes]) -> anyhow::Result<Duration> {
        self.runtime.block_on(async {
            let start = Instant::now();
            futures::stream::iter(objects.iter().enumerate())
                .map(|(i, data)| {
                    let path = dir.clone().join(names[i].as_str());
                    async move { self.store.put(&path, PutPayload::from(data.clone())).await }
                })
                .buffer_unordered(self.concurrency)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(start.elapsed())
        })
    }

    /// Get `dir/<name>` for each name, each read whole, in order.
    fn get_all(&self, dir: &ObjectPath, names: &[String]) -> anyhow::Result<(Duration, Vec<Bytes>)> {
        self.runtime.block_on(async {
            let start = Instant::now();
            let fetched = futures::stream::iter(0..names.len())
                .map(|i| {
                    let path = dir.clone().join(names[i].as_str());
                    async move { self.store.get(&path).await?.bytes().await }
                })
                .buffered(self.concurrency)
                .try_collect::<Vec<_>>()
                .await?;
            Ok((start.elapsed(), fetched))
        })
    }

    /// Delete every object under `dir`.
    fn delete_under(&self, dir: &ObjectPath) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            let listed: Vec<ObjectPath> = self.store.list(Some(dir)).map_ok(|meta| meta.location).try_collect().await?;
            futures::stream::iter(listed)
                .map(|path| async move { self.store.delete(&path).await })
                .buffer_unordered(self.concurrency)
                .try_collect::<Vec<_>>()
                .await?;
            Ok(())
        })
    }
}

fn local(dir: &Path) -> anyhow::Result<Arc<dyn ObjectStore>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the remote tier's directory {}", dir.display()))?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
    Ok(Arc::new(store))
}
