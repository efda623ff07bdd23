//! What the data plane does, in Prometheus' text exposition format: transfer bytes, counts,
//! latency and errors per transport and direction, and the occupancy and counters of tier stores.
//!
//! The data path pays a handful of relaxed atomic adds per *transfer* (never per byte or per
//! op): [`Metrics`] is a fixed table of counters indexed by transport and direction. Errors, which
//! are rare, take a lock. Tier stores are read when a scrape renders them, so they cost nothing
//! between scrapes. [`Metrics::render`] is the pull API; [`serve`] answers `GET /metrics` over HTTP.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::ServeLimits;
use crate::net::{DeadlineStream, Next, Server, Service, recv_ready};
use crate::sync::Locked;
use crate::tier::{RemoteStats, TierStats, TierStore};
use crate::transport::TransferObserver;
use crate::transport::kind::{Op, TransportKind};

/// Upper bounds of the transfer latency histogram's buckets, in seconds: 10 µs to 10 s, about
/// three per decade, which separates shm (µs), TCP loopback (100s of µs) and large batches (ms).
pub const LATENCY_BUCKETS: [f64; 19] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
    2.5, 5.0, 10.0,
];

const DIRECTIONS: [Op; 3] = [Op::Read, Op::Write, Op::Notify];

/// The counters of one transport in one direction.
#[derive(Default)]
struct Series {
    transfers: AtomicU64,
    bytes: AtomicU64,
    in_flight: AtomicI64,
    /// Per bucket (not cumulative; the last is `+Inf`), summed up when rendered.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_ns: AtomicU64,
}

/// What one transport moved in one direction, read from [`Metrics`] by
/// [`transfer_stats`](Metrics::transfer_stats): the numbers a scrape renders, for front ends that
/// report them their own way (vLLM's stats, say).
#[derive(Clone, Debug, PartialEq)]
pub struct TransferStats {
    pub transport: TransportKind,
    pub direction: Op,
    /// Transfers completed successfully.
    pub transfers: u64,
    /// Bytes moved by completed transfers.
    pub bytes: u64,
    /// Transfers that settled with an error, whatever its code.
    pub failures: u64,
    /// Transfers posted and not yet settled.
    pub in_flight: i64,
    /// Time from post to completion or failure, summed over every settled transfer.
    pub duration: Duration,
    /// Settled transfers per bucket of [`LATENCY_BUCKETS`] (not cumulative; the last is `+Inf`).
    pub duration_buckets: [u64; LATENCY_BUCKETS.len() + 1],
}

/// Counters of one agent's transfers, and the tier stores attached to it. Shared by the agent
/// and anything rendering it.
pub struct Metrics {
    series: [[Series; DIRECTIONS.len()]; TransportKind::ALL.len()],
    errors: Mutex<ErrorCounts>,
    stores: Mutex<Vec<(String, StatsReader)>>,
}

/// Failures keyed by (transport, direction, code) indices, so that the rendering is sorted.
type ErrorCounts = BTreeMap<(usize, usize, u32), (ErrorCode, u64)>;

type StatsReader = Box<dyn Fn() -> Option<(TierStats, usize)> + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Metrics { series: Default::default(), errors: Mutex::new(BTreeMap::new()), stores: Mutex::new(Vec::new()) }
    }
}

impl TransferObserver for Metrics {
    /// A transfer was handed to `transport`.
    fn started(&self, transport: TransportKind, op: Op) {
        self.series(transport, op).in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A transfer [`started`](TransferObserver::started) settled: `Ok(bytes)` moved, or failed with `code`.
    fn settled(&self, transport: TransportKind, op: Op, elapsed: Duration, outcome: Result<u64, ErrorCode>) {
        let series = self.series(transport, op);
        series.in_flight.fetch_sub(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(LATENCY_BUCKETS.len());
        series.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        series.latency_ns.fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        match outcome {
            Ok(bytes) => {
                series.transfers.fetch_add(1, Ordering::Relaxed);
                series.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(code) => {
                let key = (transport_index(transport), direction_index(op), code.as_u32());
                self.errors.locked().entry(key).or_insert((code, 0)).1 += 1;
            }
        }
    }

    /// A transfer [`started`](TransferObserver::started) was refused before it was queued: it never settles.
    fn abandoned(&self, transport: TransportKind, op: Op) {
        self.series(transport, op).in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn transport_index(kind: TransportKind) -> usize {
    TransportKind::ALL.iter().position(|&k| k == kind).expect("ALL lists every transport")
}

fn direction_index(op: Op) -> usize {
    DIRECTIONS.iter().position(|&d| d == op).expect("DIRECTIONS lists every op")
}

impl Metrics {
    fn series(&self, transport: TransportKind, op: Op) -> &Series {
        &self.series[transport_index(transport)][direction_index(op)]
    }

    /// What a successful transfer costs the data path (`started`, then `settled`), for benchmarks.
    #[doc(hidden)]
    pub fn record_for_bench(&self, transport: TransportKind, op: Op, elapsed: Duration, bytes: u64) {
        self.started(transport, op);
        self.settled(transport, op, elapsed, Ok(bytes));
    }

    /// Include `store` in the rendering under the label `store="name"`, for as long as it is open.
    pub fn add_tier_store(&self, name: impl Into<String>, store: &TierStore) {
        self.stores.locked().push((name.into(), Box::new(store.stats_reader())));
    }

    /// Bytes moved by completed transfers of `transport` in direction `op`.
    pub fn bytes(&self, transport: TransportKind, op: Op) -> u64 {
        self.series(transport, op).bytes.load(Ordering::Relaxed)
    }

    /// Completed transfers of `transport` in direction `op`.
    pub fn transfers(&self, transport: TransportKind, op: Op) -> u64 {
        self.series(transport, op).transfers.load(Ordering::Relaxed)
    }

    /// Failed transfers with this error code, over every transport and direction.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors.locked().values().filter(|(c, _)| *c == code).map(|(_, n)| n).sum()
    }

    /// Everything, in Prometheus' text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        self.render_transfers(&mut out);
        self.render_stores(&mut out);
        out.text
    }

    /// Every transport and direction that moved anything or has a transfer in flight, in a fixed
    /// order (transports as [`TransportKind::ALL`], then read, write, notify).
    pub fn transfer_stats(&self) -> Vec<TransferStats> {
        let errors = self.errors.locked();
        let mut out = Vec::new();
        for (t, &transport) in TransportKind::ALL.iter().enumerate() {
            for (d, &direction) in DIRECTIONS.iter().enumerate() {
                let s = &self.series[t][d];
                let duration_buckets = std::array::from_fn(|i| s.buckets[i].load(Ordering::Relaxed));
                let in_flight = s.in_flight.load(Ordering::Relaxed);
                // Series that never moved anything stay out, so a reading lists what this agent uses.
                if in_flight == 0 && duration_buckets.iter().all(|&n| n == 0) {
                    continue;
                }
                let failures = errors.range((t, d, 0)..=(t, d, u32::MAX)).map(|(_, (_, n))| n).sum();
                out.push(TransferStats {
                    transport,
                    direction,
                    transfers: s.transfers.load(Ordering::Relaxed),
                    bytes: s.bytes.load(Ordering::Relaxed),
                    failures,
                    in_flight,
                    duration: Duration::from_nanos(s.latency_ns.load(Ordering::Relaxed)),
                    duration_buckets,
                });
            }
        }
        out
    }

    fn render_transfers(&self, out: &mut Exposition) {
        let stats = self.transfer_stats();
        let labelled =
            || stats.iter().map(|s| (format!("transport=\"{}\",direction=\"{}\"", s.transport, s.direction), s));
        out.family("kvferry_transfer_bytes_total", "counter", "Bytes moved by completed transfers.");
        for (labels, s) in labelled() {
            out.sample("kvferry_transfer_bytes_total", &labels, s.bytes);
        }
        out.family("kvferry_transfers_total", "counter", "Transfers completed successfully.");
        for (labels, s) in labelled() {
            out.sample("kvferry_transfers_total", &labels, s.transfers);
        }
        out.family("kvferry_transfers_in_flight", "gauge", "Transfers posted and not yet settled.");
        for (labels, s) in labelled() {
            out.sample("kvferry_transfers_in_flight", &labels, s.in_flight);
        }
        out.family(
            "kvferry_transfer_duration_seconds",
            "histogram",
            "Time from post to completion or failure of each transfer.",
        );
        for (labels, s) in labelled() {
            let mut cumulative = 0;
            for (i, bucket) in s.duration_buckets.iter().enumerate() {
                cumulative += bucket;
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), f64::to_string);
                out.sample("kvferry_transfer_duration_seconds_bucket", &format!("{labels},le=\"{le}\""), cumulative);
            }
            out.sample("kvferry_transfer_duration_seconds_sum", &labels, s.duration.as_secs_f64());
            out.sample("kvferry_transfer_duration_seconds_count", &labels, cumulative);
        }
        out.family("kvferry_transfer_errors_total", "counter", "Failed transfers by error code and kind.");
        for (&(t, op, _), (code, n)) in self.errors.locked().iter() {
            let (t, op) = (TransportKind::ALL[t], DIRECTIONS[op]);
            let labels = format!(
                "transport=\"{t}\",direction=\"{op}\",code=\"{}\",kind=\"{}\"",
                code.as_u32(),
                snake_case(code.name())
            );
            out.sample("kvferry_transfer_errors_total", &labels, n);
        }
    }

    fn render_stores(&self, out: &mut Exposition) {
        // Stores that were dropped leave the list.
        let mut stats: Vec<(String, TierStats, usize)> = Vec::new();
        self.stores.locked().retain(|(name, read)| match read() {
            Some((s, block_size)) => {
                stats.push((name.clone(), s, block_size));
                true
            }
            None => false,
        });
        if stats.is_empty() {
            return;
        }
        for (name, kind, help, (cpu, disk), unit) in PER_TIER {
            out.family(name, kind, help);
            for (store, s, block_size) in &stats {
                let counts = s.counts();
                let scale = match unit {
                    Unit::Bytes => *block_size as u64,
                    Unit::Blocks => 1,
                };
                for (tier, count) in [("CPU", cpu), ("DISK", disk)] {
                    // A store without a disk tier has no DISK series.
                    if tier == "DISK" && s.disk_capacity_blocks == 0 {
                        continue;
                    }
                    let labels = format!("store=\"{}\",tier=\"{tier}\"", escape(store));
                    out.sample(name, &labels, count_of(&counts, count) * scale);
                }
            }
        }
        for (name, help, count) in PER_STORE {
            out.family(name, "counter", help);
            for (store, s, _) in &stats {
                out.sample(name, &format!("store=\"{}\"", escape(store)), count_of(&s.counts(), count));
            }
        }
        render_remotes(out, &stats);
    }
}

enum Unit {
    Blocks,
    Bytes,
}

type TierSeries = (&'static str, &'static str, &'static str, (&'static str, &'static str), Unit);

/// The store's series with a `tier` label: (name, type, help, (CPU count, DISK count) by their
/// names in [`TierStats::counts`], unit). Every count is rendered by this table or the next
/// (a test checks), so a count added to the store cannot be left out of a scrape.
const PER_TIER: [TierSeries; 6] = [
    ("kvferry_tier_used_bytes", "gauge", "Bytes of blocks a tier holds.", ("host_blocks", "disk_blocks"), Unit::Bytes),
    (
        "kvferry_tier_capacity_bytes",
        "gauge",
        "Bytes of blocks a tier can hold.",
        ("host_capacity_blocks", "disk_capacity_blocks"),
        Unit::Bytes,
    ),
    ("kvferry_tier_blocks", "gauge", "Blocks a tier holds.", ("host_blocks", "disk_blocks"), Unit::Blocks),
    (
        "kvferry_tier_capacity_blocks",
        "gauge",
        "Blocks a tier can hold.",
        ("host_capacity_blocks", "disk_capacity_blocks"),
        Unit::Blocks,
    ),
    ("kvferry_tier_hits_total", "counter", "Blocks a get found in a tier.", ("host_hits", "disk_hits"), Unit::Blocks),
    (
        "kvferry_tier_evictions_total",
        "counter",
        "Blocks evicted from a tier.",
        ("host_evictions", "disk_evictions"),
        Unit::Blocks,
    ),
];

/// The store's counters without a tier: (name, help, count by its name in [`TierStats::counts`]).
const PER_STORE: [(&str, &str, &str); 6] = [
    ("kvferry_tier_misses_total", "Blocks a get found in no tier.", "misses"),
    (
        "kvferry_tier_admissions_rejected_total",
        "Blocks evicted from DRAM that the admission filter kept off the disk.",
        "not_admitted",
    ),
    ("kvferry_tier_promotions_total", "Disk blocks read back into DRAM on a hit.", "promotions"),
    (
        "kvferry_tier_checksum_failures_total",
        "Disk blocks that failed their checksum on read and were dropped.",
        "corrupt_blocks",
    ),
    ("kvferry_tier_disk_writes_total", "Blocks written to the disk tier.", "disk_writes"),
    (
        "kvferry_tier_torn_records_total",
        "Index records found torn when the disk tier was opened (an append cut short by a crash), skipped.",
        "torn_records",
    ),
];

/// The remote tier's series: (name, type, help, count by its name in [`RemoteStats::counts`]).
const PER_REMOTE: [(&str, &str, &str, &str); 11] = [
    ("kvferry_tier_remote_hits_total", "counter", "Blocks read from the remote tier.", "hits"),
    ("kvferry_tier_remote_misses_total", "counter", "Keys the remote tier did not hold when asked.", "misses"),
    ("kvferry_tier_remote_uploads_total", "counter", "Blocks uploaded to the remote tier.", "uploads"),
    (
        "kvferry_tier_remote_upload_bytes_total",
        "counter",
        "Bytes of blocks uploaded to the remote tier.",
        "upload_bytes",
    ),
    (
        "kvferry_tier_remote_already_stored_total",
        "counter",
        "Offered blocks not uploaded because the remote tier already held them.",
        "already_stored",
    ),
    (
        "kvferry_tier_remote_dropped_total",
        "counter",
        "Offered blocks not uploaded: the upload budget was spent or the breaker was open.",
        "dropped",
    ),
    (
        "kvferry_tier_remote_errors_total",
        "counter",
        "Requests to the remote tier that failed (unreachable, timed out, refused by the server).",
        "errors",
    ),
    (
        "kvferry_tier_remote_corrupt_total",
        "counter",
        "Remote objects that failed their checksum or framing; dropped, never served.",
        "corrupt",
    ),
    (
        "kvferry_tier_remote_mismatched_total",
        "counter",
        "Remote objects under this store's name holding another namespace's or key's block; dropped.",
        "mismatched",
    ),
    (
        "kvferry_tier_remote_breaker_trips_total",
        "counter",
        "Times the remote tier's circuit breaker opened after repeated failures.",
        "breaker_trips",
    ),
    (
        "kvferry_tier_remote_upload_bytes_pending",
        "gauge",
        "Bytes of uploads to the remote tier queued or in flight.",
        "upload_bytes_pending",
    ),
];

/// The count named `name` in a `counts()` list.
fn count_of(counts: &[(&str, u64)], name: &str) -> u64 {
    counts.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).expect("the metrics name only counts the store keeps")
}

/// The remote tier's series, for the stores that have one (none at all when no store has).
fn render_remotes(out: &mut Exposition, stats: &[(String, TierStats, usize)]) {
    let remotes: Vec<(&String, &RemoteStats)> =
        stats.iter().filter_map(|(store, s, _)| Some((store, s.remote.as_ref()?))).collect();
    if remotes.is_empty() {
        return;
    }
    for (name, kind, help, count) in PER_REMOTE {
        out.family(name, kind, help);
        for (store, r) in &remotes {
            out.sample(name, &format!("store=\"{}\"", escape(store)), count_of(&r.counts(), count));
        }
    }
    // A state rather than a count, so not in `counts()`.
    let name = "kvferry_tier_remote_breaker_open";
    out.family(name, "gauge", "1 while the circuit breaker sends no request to the remote tier, else 0.");
    for (store, r) in &remotes {
        out.sample(name, &format!("store=\"{}\"", escape(store)), u64::from(r.breaker_open));
    }
}

/// `PeerDisconnected` → `peer_disconnected`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A label value with `\`, `"` and newlines escaped, as the exposition format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.text, "{name}{{{labels}}} {value}");
    }
}

/// Serves `GET /metrics` (any other path is 404) until dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    _server: Server<Scrapes>,
}

impl MetricsServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A client that stalls is dropped after this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads longer than this are refused.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Answer Prometheus scrapes on `listen` with `render()`'s text, one request per connection, on
/// a fixed set of threads (one serves, one accepts) whatever the number of clients.
pub fn serve(listen: SocketAddr, render: impl Fn() -> String + Send + Sync + 'static) -> Result<MetricsServer> {
    let listener = TcpListener::bind(listen).map_err(|e| Error::io(format!("binding {listen}"), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
    let limits = ServeLimits {
        workers: 1,
        handshake_workers: 1,
        max_connections: 64,
        max_unauthenticated: 64,
        max_per_ip: 64,
        handshake_timeout: HTTP_TIMEOUT,
        idle_timeout: HTTP_TIMEOUT,
        request_bytes: 64 * MAX_REQUEST_HEAD as u64,
    };
    let server = Server::start(listener, "kvferry-metrics", Arc::new(Scrapes { render: Box::new(render) }), limits)?;
    Ok(MetricsServer { addr, _server: server })
}

struct Scrapes {
    render: Box<dyn Fn() -> String + Send + Sync>,
}

impl Service for Scrapes {
    type Stream = TcpStream;
    /// The request head as it arrives.
    type Conn = Vec<u8>;
    type Worker = ();

    fn request_timeout(&self) -> Duration {
        HTTP_TIMEOUT
    }

    /// Metrics are public: there is no secret to prove.
    fn handshake(&self, _: &mut TcpStream, _: Deadline) -> std::io::Result<Vec<u8>> {
        Ok(Vec::new())
    }

    fn readable(
        &self,
        stream: &mut TcpStream,
        head: &mut Vec<u8>,
        _: &mut (),
        deadline: Deadline,
    ) -> std::io::Result<Next> {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match recv_ready(stream, &mut chunk) {
                Ok(n) if n == 0 || head.len() + n > MAX_REQUEST_HEAD => {
                    respond(stream, "400 Bad Request", "text/plain", "bad request\n", deadline)?;
                    return Ok(Next::Close);
                }
                Ok(n) => head.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Next::Park),
                Err(e) => return Err(e),
            }
        }
        let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)]).into_owned();
        let mut parts = line.split(' ');
        match (parts.next(), parts.next().map(|p| p.split('?').next().unwrap_or(p))) {
            (Some("GET"), Some("/metrics")) => {
                let text = (self.render)();
                respond(stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &text, deadline)
            }
            (Some("GET"), _) => respond(stream, "404 Not Found", "text/plain", "metrics are at /metrics\n", deadline),
            _ => respond(stream, "405 Method Not Allowed", "text/plain", "only GET is served\n", deadline),
        }?;
        Ok(Next::Close)
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    deadline: Deadline,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all_by(head.as_bytes(), deadline)?;
    stream.write_all_by(body.as_bytes(), deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The scrape renders every count the store and its remote tier keep, and names no other: a
    /// count added to `TierStats::counts` or `RemoteStats::counts` fails here until a series shows it.
    #[test]
    fn the_series_cover_exactly_the_counts_of_the_store() {
        use std::collections::BTreeSet;
        let rendered: BTreeSet<&str> = PER_TIER
            .iter()
            .flat_map(|(_, _, _, (cpu, disk), _)| [*cpu, *disk])
            .chain(PER_STORE.iter().map(|(_, _, count)| *count))
            .collect();
        let kept: BTreeSet<&str> = TierStats::default().counts().iter().map(|(name, _)| *name).collect();
        assert_eq!(rendered, kept);
        let rendered: BTreeSet<&str> = PER_REMOTE.iter().map(|(_, _, _, count)| *count).collect();
        let kept: BTreeSet<&str> = RemoteStats::default().counts().iter().map(|(name, _)| *name).collect();
        assert_eq!(rendered, kept);
    }

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn settled_transfers_land_in_counters_buckets_and_errors() {
        let m = Metrics::default();
        for (elapsed, outcome) in [
            (Duration::from_micros(30), Ok(4096)),
            (Duration::from_millis(3), Ok(1 << 20)),
            (Duration::from_secs(20), Err(ErrorCode::Timeout)),
        ] {
            m.started(TransportKind::Tcp, Op::Read);
            m.settled(TransportKind::Tcp, Op::Read, elapsed, outcome);
        }
        m.started(TransportKind::Shm, Op::Write);
        let text = m.render();
        let l = "transport=\"tcp\",direction=\"read\"";
        assert_eq!(sample(&text, &format!("kvferry_transfer_bytes_total{{{l}}}")), Some((4096 + (1 << 20)) as f64));
        assert_eq!(sample(&text, &format!("kvferry_transfers_total{{{l}}}")), Some(2.0));
        assert_eq!(sample(&text, &format!("kvferry_transfers_in_flight{{{l}}}")), Some(0.0));
        let shm = "transport=\"shm\",direction=\"write\"";
        assert_eq!(sample(&text, &format!("kvferry_transfers_in_flight{{{shm}}}")), Some(1.0));
        // Cumulative buckets: 30 µs falls in le=5e-5, 3 ms in le=0.005, 20 s only in +Inf.
        let bucket = |le: &str| sample(&text, &format!("kvferry_transfer_duration_seconds_bucket{{{l},le=\"{le}\"}}"));
        assert_eq!(bucket("0.000025"), Some(0.0));
        assert_eq!(bucket("0.00005"), Some(1.0));
        assert_eq!(bucket("0.005"), Some(2.0));
        assert_eq!(bucket("10"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(3.0));
        assert_eq!(sample(&text, &format!("kvferry_transfer_duration_seconds_count{{{l}}}")), Some(3.0));
        let errors = format!("kvferry_transfer_errors_total{{{l},code=\"500\",kind=\"timeout\"}}");
        assert_eq!(sample(&text, &errors), Some(1.0), "{text}");
        assert_eq!(m.errors(ErrorCode::Timeout), 1);
        // Unused transports stay out; every family has HELP and TYPE.
        assert!(!text.contains("transport=\"fabric\""));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "no TYPE for {name}");
        }
    }

    #[test]
    fn tier_stores_are_rendered_while_open_with_occupancy_hits_and_promotions() {
        use crate::Deadline;
        use crate::memory::host::{HostAllocOptions, HostBuffer, HostDevice};
        use crate::memory::{Device, MemRegion};
        use crate::tier::{BlockKey, DiskConfig, RemoteConfig, RemoteLocation, TierConfig};

        const BLOCK: usize = 4096;
        let unpinned = HostAllocOptions::new().with_pin(false);
        let dir = std::env::temp_dir().join(format!("kvferry-metrics-tier-{}", std::process::id()));
        let disk = DiskConfig::new(&dir, 8 * BLOCK as u64).with_admit_after(0);
        let config = TierConfig::new(BLOCK, 2 * BLOCK as u64).with_host_alloc(unpinned).with_disk(disk);
        let store = TierStore::open(config).unwrap();
        let m = Metrics::default();
        m.add_tier_store("kv\"0", &store);
        let buf = HostBuffer::alloc(BLOCK, &unpinned).unwrap();
        let host: std::sync::Arc<dyn Device> = std::sync::Arc::new(HostDevice::with_threads(1).unwrap());
        let block = |i: u32| vec![(BlockKey::chain(None, &[i], b""), vec![MemRegion::host(buf.as_ptr(), BLOCK)])];
        let wait = |fence: Result<crate::memory::CopyFence>| {
            fence.and_then(|f| f.wait(Deadline::after(Duration::from_secs(30))))
        };
        for i in 0..3 {
            // SAFETY: `buf` outlives every wait.
            wait(unsafe { store.put(host.clone(), block(i)) }).unwrap();
        }
        wait(unsafe { store.get(host.clone(), block(0)) }).unwrap(); // on disk: a hit there, promoted
        wait(unsafe { store.get(host.clone(), block(9)) }).unwrap_err(); // nowhere: a miss

        let text = m.render();
        let s = "store=\"kv\\\"0\"";
        let at = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in {text}"));
        assert_eq!(at(&format!("kvferry_tier_capacity_bytes{{{s},tier=\"CPU\"}}")), (2 * BLOCK) as f64);
        assert_eq!(at(&format!("kvferry_tier_capacity_blocks{{{s},tier=\"DISK\"}}")), 8.0);
        assert_eq!(at(&format!("kvferry_tier_used_bytes{{{s},tier=\"CPU\"}}")), (2 * BLOCK) as f64);
        assert_eq!(at(&format!("kvferry_tier_hits_total{{{s},tier=\"DISK\"}}")), 1.0);
        assert_eq!(at(&format!("kvferry_tier_hits_total{{{s},tier=\"CPU\"}}")), 0.0);
        assert_eq!(at(&format!("kvferry_tier_misses_total{{{s}}}")), 1.0);
        assert_eq!(at(&format!("kvferry_tier_promotions_total{{{s}}}")), 1.0);
        assert!(at(&format!("kvferry_tier_evictions_total{{{s},tier=\"CPU\"}}")) >= 1.0);
        assert_eq!(at(&format!("kvferry_tier_checksum_failures_total{{{s}}}")), 0.0);
        assert!(!text.contains("kvferry_tier_remote_"), "no store has a remote tier: {text}");

        // Two stores sharing a remote tier: one uploads, the other reads one block and misses one.
        let shared = std::env::temp_dir().join(format!("kvferry-metrics-remote-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&shared);
        let with_remote = || {
            let remote = RemoteConfig::new(RemoteLocation::Path(shared.clone()), "metrics");
            TierStore::open(TierConfig::new(BLOCK, 4 * BLOCK as u64).with_host_alloc(unpinned).with_remote(remote))
        };
        let (writer, reader) = (with_remote().unwrap(), with_remote().unwrap());
        m.add_tier_store("writer", &writer);
        m.add_tier_store("reader", &reader);
        for i in 0..2 {
            wait(unsafe { writer.put(host.clone(), block(i)) }).unwrap();
        }
        assert!(writer.remote().unwrap().flush(Deadline::after(Duration::from_secs(30))));
        wait(unsafe { reader.get(host.clone(), block(1)) }).unwrap();
        wait(unsafe { reader.get(host.clone(), block(9)) }).unwrap_err();

        let text = m.render();
        let at = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in {text}"));
        let (w, r) = ("store=\"writer\"", "store=\"reader\"");
        assert_eq!(at(&format!("kvferry_tier_remote_uploads_total{{{w}}}")), 2.0);
        assert_eq!(at(&format!("kvferry_tier_remote_upload_bytes_total{{{w}}}")), (2 * BLOCK) as f64);
        assert_eq!(at(&format!("kvferry_tier_remote_upload_bytes_pending{{{w}}}")), 0.0);
        assert_eq!(at(&format!("kvferry_tier_remote_uploads_total{{{r}}}")), 0.0);
        assert_eq!(at(&format!("kvferry_tier_remote_hits_total{{{r}}}")), 1.0);
        assert_eq!(at(&format!("kvferry_tier_remote_misses_total{{{r}}}")), 1.0);
        for zero in [
            "already_stored_total",
            "dropped_total",
            "errors_total",
            "corrupt_total",
            "mismatched_total",
            "breaker_trips_total",
            "breaker_open",
        ] {
            for store in [w, r] {
                assert_eq!(at(&format!("kvferry_tier_remote_{zero}{{{store}}}")), 0.0);
            }
        }
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE kvferry_tier_remote_")) {
            let name = family.split(' ').next().unwrap();
            assert!(text.contains(&format!("# HELP kvferry_tier_remote_{name} ")), "no HELP for {name}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE kvferry_tier_remote_")).count(), 12);
        assert!(!text.lines().any(|l| l.starts_with("kvferry_tier_remote_") && l.contains(s)), "{text}");
        drop((store, writer, reader));
        assert!(!m.render().contains("kvferry_tier_"), "a closed store is no longer rendered");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&shared);
    }

    #[test]
    fn the_endpoint_serves_metrics_and_refuses_other_requests() {
        let m = std::sync::Arc::new(Metrics::default());
        m.started(TransportKind::Tcp, Op::Write);
        m.settled(TransportKind::Tcp, Op::Write, Duration::from_millis(1), Ok(123));
        let metrics = m.clone();
        let server = serve("127.0.0.1:0".parse().unwrap(), move || metrics.render()).unwrap();
        let get = |request: &str| {
            let mut s = TcpStream::connect(server.local_addr()).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        let body = ok.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(sample(body, "kvferry_transfer_bytes_total{transport=\"tcp\",direction=\"write\"}"), Some(123.0));
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get("garbage").starts_with("HTTP/1.1 400"));
    }
}
