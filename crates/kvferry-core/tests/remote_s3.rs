//! The remote tier against a real S3 server: Garage (scripts/garage.sh) on loopback, one node and a
//! three-node cluster with replication 3 that loses a node mid-workload, a server killed and one
//! stopped (SIGSTOP) under load. Without Garage the tests skip, saying why, unless KVFERRY_GARAGE
//! names it (the project's test script installs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kvferry_core::memory::MemRegion;
use kvferry_core::memory::host::HostBuffer;
use kvferry_core::tier::{BlockKey, Medium, RemoteConfig, RemoteLocation, TierConfig, TierError, TierStore};
use kvferry_core::{Deadline, Device, ErrorCode, HostAllocOptions, HostDevice};
use object_store::ObjectStoreExt;

const BLOCK: usize = 64 << 10;
const UNPINNED: HostAllocOptions = HostAllocOptions::new().with_pin(false);

/// A Garage cluster started for one test, stopped when dropped.
struct Garage {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Garage {
    fn start(name: &str, nodes: u32) -> Option<Garage> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh");
        let dir = std::env::temp_dir().join(format!("kvferry-garage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new("bash").arg(&script).arg("start").arg(&dir).arg(nodes.to_string()).output().unwrap();
        match out.status.code() {
            Some(0) => {}
            // The project's test script installs Garage and names it: there, a missing one fails.
            Some(2) if std::env::var_os("KVFERRY_GARAGE").is_none() => {
                eprintln!("skipped: no Garage S3 server here ({})", String::from_utf8_lossy(&out.stderr).trim());
                return None;
            }
            _ => panic!(
                "garage.sh start failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
        let env = std::fs::read_to_string(dir.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        Some(Garage { dir, env })
    }

    fn var(&self, key: &str) -> &str {
        &self.env.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{key} not in garage.sh's env")).1
    }

    fn kill_node(&self, node: u32) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh");
        let status =
            Command::new("bash").arg(&script).arg("kill").arg(&self.dir).arg(node.to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Remote settings reaching the cluster through `endpoint`, credentials as options (each test
    /// has its own cluster, so the process environment is not touched).
    fn remote(&self, endpoint: &str, prefix: &str, namespace: &str) -> RemoteConfig {
        let url = format!("s3://{}/{prefix}", self.var("KVFERRY_S3_BUCKET"));
        RemoteConfig::new(RemoteLocation::Url(url), namespace)
            .with_option("aws_endpoint", endpoint)
            .with_option("aws_allow_http", "true")
            .with_option("aws_region", self.var("AWS_REGION"))
            .with_option("aws_access_key_id", self.var("AWS_ACCESS_KEY_ID"))
            .with_option("aws_secret_access_key", self.var("AWS_SECRET_ACCESS_KEY"))
            .with_timeout(Duration::from_secs(10))
    }

    /// A raw client of the bucket, as another writer of it would be.
    fn raw(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(self.var("KVFERRY_S3_BUCKET"))
            .with_endpoint(self.var("AWS_ENDPOINT"))
            .with_allow_http(true)
            .with_region(self.var("AWS_REGION"))
            .with_access_key_id(self.var("AWS_ACCESS_KEY_ID"))
            .with_secret_access_key(self.var("AWS_SECRET_ACCESS_KEY"))
            .build()
            .unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh");
        let _ = Command::new("bash").arg(&script).arg("stop").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(60))
}

fn key(i: u32) -> BlockKey {
    BlockKey::chain(None, &[i], b"s3")
}

fn pattern(i: u32) -> Vec<u8> {
    let mut state = (i as u64 + 7).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..BLOCK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn host() -> Arc<dyn Device> {
    Arc::new(HostDevice::with_threads(1).unwrap())
}

fn store(remote: RemoteConfig, host_blocks: usize) -> TierStore {
    TierStore::open(TierConfig::new(BLOCK, (host_blocks * BLOCK) as u64).with_host_alloc(UNPINNED).with_remote(remote))
        .unwrap()
}

fn put(store: &TierStore, ids: &[u32]) {
    let buf = HostBuffer::alloc(ids.len() * BLOCK, &UNPINNED).unwrap();
    let mut blocks = Vec::new();
    for (n, &i) in ids.iter().enumerate() {
        buf.write_at(n * BLOCK, &pattern(i)).unwrap();
        blocks.push((key(i), vec![MemRegion::host(buf.as_ptr().wrapping_add(n * BLOCK), BLOCK)]));
    }
    // SAFETY: `buf` outlives the wait.
    unsafe { store.put(host(), blocks) }.unwrap().wait(deadline()).unwrap();
}

/// Get blocks `ids` and check every byte.
fn get_exact(store: &TierStore, ids: &[u32]) -> kvferry_core::Result<()> {
    let out = HostBuffer::alloc(ids.len() * BLOCK, &UNPINNED).unwrap();
    let blocks = ids
        .iter()
        .enumerate()
        .map(|(n, &i)| (key(i), vec![MemRegion::host(out.as_ptr().wrapping_add(n * BLOCK), BLOCK)]))
        .collect();
    // SAFETY: `out` outlives the wait.
    unsafe { store.get(host(), blocks) }?.wait(deadline())?;
    let bytes = out.to_vec();
    for (n, &i) in ids.iter().enumerate() {
        assert!(bytes[n * BLOCK..(n + 1) * BLOCK] == pattern(i)[..], "block {i} came back different");
    }
    Ok(())
}

/// `lookup_remote` once it has its answer.
fn lookup_remote(store: &TierStore, ids: &[u32]) -> Vec<Medium> {
    let keys: Vec<BlockKey> = ids.iter().map(|&i| key(i)).collect();
    let until = deadline();
    loop {
        if let Some(found) = store.lookup_remote(&keys) {
            return found;
        }
        assert!(!until.expired(), "the remote lookup did not end");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn s3_blocks_stored_by_one_store_are_read_byte_exact_by_another() {
    let Some(garage) = Garage::start("one", 1) else { return };
    let endpoint = garage.var("AWS_ENDPOINT").to_string();
    let writer = store(garage.remote(&endpoint, "kv", "model-a"), 32);
    let ids: Vec<u32> = (0..16).collect();
    put(&writer, &ids);
    assert!(writer.remote().unwrap().flush(deadline()));
    let stats = writer.stats().remote.unwrap();
    assert_eq!((stats.uploads, stats.errors, stats.dropped), (16, 0, 0), "{stats:?}");

    let reader = store(garage.remote(&endpoint, "kv", "model-a"), 32);
    assert_eq!(lookup_remote(&reader, &ids), vec![Medium::Remote; 16]);
    get_exact(&reader, &ids).unwrap();
    assert_eq!(reader.lookup(&ids.iter().map(|&i| key(i)).collect::<Vec<_>>()), vec![Medium::Cpu; 16]);
    assert_eq!(reader.stats().remote.unwrap().hits, 16);
    // A block no tier holds, the remote included: not cached, and a miss of the store.
    assert_eq!(get_exact(&reader, &[999]).unwrap_err().code(), ErrorCode::TierNotCached);
    assert_eq!(reader.stats().misses, 1);
    // Another namespace on the same bucket and prefix finds none of them.
    let other = store(garage.remote(&endpoint, "kv", "model-b"), 4);
    assert!(lookup_remote(&other, &ids).is_empty());
}

#[test]
fn s3_objects_forged_by_another_writer_are_refused_and_counted() {
    let Some(garage) = Garage::start("forged", 1) else { return };
    let endpoint = garage.var("AWS_ENDPOINT").to_string();
    let writer = store(garage.remote(&endpoint, "kv", "model-a"), 8);
    put(&writer, &[0, 1, 2]);
    assert!(writer.remote().unwrap().flush(deadline()));
    let fingerprint = writer.remote().unwrap().fingerprint();
    let other = store(garage.remote(&endpoint, "kv", "model-b"), 8);
    put(&other, &[0]);
    assert!(other.remote().unwrap().flush(deadline()));
    let other_fingerprint = other.remote().unwrap().fingerprint();
    let path = |ns: &str, i: u32| {
        let hex: String = key(i).as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        object_store::path::Path::from(format!("kv/{ns}/{hex}"))
    };
    let raw = garage.raw();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Block 0: another namespace's intact object copied under ours. Block 1: block 2's intact
        // object under block 1's name. Block 3: garbage where no block was stored.
        let foreign = raw.get(&path(&other_fingerprint, 0)).await.unwrap().bytes().await.unwrap();
        raw.put(&path(&fingerprint, 0), foreign.into()).await.unwrap();
        let block2 = raw.get(&path(&fingerprint, 2)).await.unwrap().bytes().await.unwrap();
        raw.put(&path(&fingerprint, 1), block2.into()).await.unwrap();
        raw.put(&path(&fingerprint, 3), vec![0x4b; 1000].into()).await.unwrap();
    });

    let reader = store(garage.remote(&endpoint, "kv", "model-a"), 8);
    for (id, code) in
        [(0, ErrorCode::TierRemoteMismatch), (1, ErrorCode::TierRemoteMismatch), (3, ErrorCode::TierRemoteCorrupt)]
    {
        let error = get_exact(&reader, &[id]).unwrap_err();
        assert_eq!(error.code(), code, "block {id}: {error}");
        assert!(matches!(
            error,
            kvferry_core::Error::Tier(TierError::RemoteMismatch { .. } | TierError::RemoteCorrupt { .. })
        ));
    }
    // Nothing forged was kept, and the intact block is served.
    assert!(reader.lookup(&[key(0), key(1), key(3)]).is_empty());
    get_exact(&reader, &[2]).unwrap();
    let stats = reader.stats().remote.unwrap();
    assert_eq!((stats.mismatched, stats.corrupt, stats.hits), (2, 1, 1), "{stats:?}");
}

#[test]
fn s3_a_three_node_cluster_that_loses_a_node_mid_workload_keeps_serving() {
    let Some(garage) = Garage::start("three", 3) else { return };
    let node1 = garage.var("GARAGE_NODE1_S3").to_string();
    let node2 = garage.var("GARAGE_NODE2_S3").to_string();
    let writer = store(garage.remote(&node1, "kv", "model-a"), 64);
    let first: Vec<u32> = (0..24).collect();
    let second: Vec<u32> = (24..48).collect();
    put(&writer, &first);
    // Node 3 dies while the first blocks are still being uploaded; replication 3 with quorum 2
    // keeps every write and read going through the two left.
    garage.kill_node(3);
    put(&writer, &second);
    assert!(writer.remote().unwrap().flush(deadline()));
    let stats = writer.stats().remote.unwrap();
    assert_eq!(stats.uploads, 48, "{stats:?}");

    // A reader through another surviving node sees every block, byte for byte.
    let reader = store(garage.remote(&node2, "kv", "model-a"), 64);
    let all: Vec<u32> = (0..48).collect();
    assert_eq!(lookup_remote(&reader, &all), vec![Medium::Remote; 48]);
    get_exact(&reader, &all).unwrap();
    assert_eq!(reader.stats().remote.unwrap().hits, 48);
}

#[test]
fn s3_a_server_killed_under_load_fails_fast_opens_the_breaker_and_dram_keeps_serving() {
    let Some(garage) = Garage::start("killed", 1) else { return };
    let endpoint = garage.var("AWS_ENDPOINT").to_string();
    let remote = garage.remote(&endpoint, "kv", "model-a").with_breaker(2, Duration::from_secs(3600));
    let store = store(remote, 64);
    put(&store, &(0..8).collect::<Vec<_>>());
    assert!(store.remote().unwrap().flush(deadline()));
    drop(garage);
    // Uploads meet a dead server: they fail and the breaker opens; later ones are dropped at once.
    put(&store, &(8..24).collect::<Vec<_>>());
    assert!(store.remote().unwrap().flush(deadline()));
    let stats = store.stats().remote.unwrap();
    assert!(stats.breaker_open && stats.errors >= 2 && stats.uploads == 8, "{stats:?}");
    put(&store, &(24..32).collect::<Vec<_>>());
    let stats = store.stats().remote.unwrap();
    assert_eq!((stats.dropped, stats.upload_bytes_pending), (8, 0), "{stats:?}");
    // A lookup past DRAM answers at once with what DRAM holds; DRAM serves every block it has.
    let ids: Vec<u32> = (0..40).collect();
    assert_eq!(lookup_remote(&store, &ids), vec![Medium::Cpu; 32]);
    get_exact(&store, &(0..32).collect::<Vec<_>>()).unwrap();
    // A block only the dead remote had: a typed error, quickly (the breaker is open).
    let started = std::time::Instant::now();
    let error = get_exact(&store, &[99]).unwrap_err();
    assert_eq!(error.code(), ErrorCode::TierRemoteUnavailable, "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(pid: &str, signal: &str) {
    assert!(Command::new("kill").arg(format!("-{signal}")).arg(pid).status().unwrap().success());
}

#[test]
fn s3_a_stopped_server_is_cut_off_at_each_deadline_and_read_again_once_it_resumes() {
    let Some(garage) = Garage::start("stopped", 1) else { return };
    let endpoint = garage.var("AWS_ENDPOINT").to_string();
    let pid = garage.var("GARAGE_NODE1_PID").to_string();
    let timeout = Duration::from_secs(2);
    let remote = || garage.remote(&endpoint, "kv", "model-a").with_timeout(timeout).with_breaker(2, timeout);
    let writer = store(remote(), 64);
    put(&writer, &(0..8).collect::<Vec<_>>());
    assert!(writer.remote().unwrap().flush(deadline()));
    let reader = store(remote(), 64);

    // The server stops answering (its sockets stay open: connections are taken, nothing comes back).
    signal(&pid, "STOP");
    let resume = Resume(&pid);
    // A block only the remote holds: a typed error once the request's deadline has passed, twice,
    // and then the breaker is open.
    for _ in 0..2 {
        let error = get_exact(&reader, &[0]).unwrap_err();
        assert_eq!(error.code(), ErrorCode::TierRemoteUnavailable, "{error}");
    }
    assert!(reader.stats().remote.unwrap().breaker_open);
    assert!(reader.lookup(&[key(0)]).is_empty(), "a block that never arrived was published");
    // Uploads to the stopped server end by their deadlines too: the flush returns, nothing stored.
    put(&writer, &(8..16).collect::<Vec<_>>());
    assert!(writer.remote().unwrap().flush(deadline()));
    let stats = writer.stats().remote.unwrap();
    assert!(stats.uploads == 8 && stats.errors >= 2 && stats.upload_bytes_pending == 0, "{stats:?}");
    // DRAM serves what it holds throughout.
    get_exact(&writer, &(0..16).collect::<Vec<_>>()).unwrap();

    // Resumed, the server is probed again after `retry_after` and the block is read.
    drop(resume);
    let until = deadline();
    while let Err(e) = get_exact(&reader, &[0]) {
        assert_eq!(e.code(), ErrorCode::TierRemoteUnavailable, "{e}");
        assert!(!until.expired(), "the resumed server was never read again: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!reader.stats().remote.unwrap().breaker_open);
    assert_eq!(reader.lookup(&[key(0)]), vec![Medium::Cpu]);
}

/// Continues a stopped process when dropped, so that a failed assertion leaves no stopped server.
struct Resume<'a>(&'a str);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}
