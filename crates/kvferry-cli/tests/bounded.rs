//! What a hostile client can make a `kvferry serve` process spend: threads stay fixed whatever the
//! number of connections, silent connections beyond the unauthenticated limit are closed while
//! authenticated peers are still served, and accepting at the descriptor limit does not spin. The
//! TCP transport and the shm transport (its abstract Unix socket) alike.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvferry::memory::host::{HostAllocOptions, HostBuffer};
use kvferry::{Agent, AgentConfig, AuthConfig, Deadline, MemKind, MemRegion, TransportKind};

const KVFERRY: &str = env!("CARGO_BIN_EXE_kvferry");
const SECRET: &str = "the bounded-resource tests' cluster secret";

/// A `kvferry serve` child with `extra` flags, killed when dropped; its side channel and TCP port.
struct Served {
    child: Child,
    side_channel: String,
    tcp: String,
    /// The shm transport's abstract socket name.
    shm: String,
    buffer_addr: u64,
}

impl Served {
    fn start(extra: &[&str], nofile: Option<u64>) -> Served {
        let mut command = Command::new(KVFERRY);
        command
            .env(kvferry::auth::SECRET_ENV, SECRET)
            .env("KVFERRY_LOG", "warn")
            .args(["serve", "--buffer-size", "1M", "--fill-seed", "3"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // SAFETY: only setrlimit between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
                    match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error()),
                    }
                })
            };
        }
        let mut child = command.spawn().expect("kvferry serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let tcp = info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_str()?.strip_prefix("tcp://"))
            .next()
            .expect("a tcp endpoint")
            .to_string();
        let shm = info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_str()?.strip_prefix("shm://"))
            .next()
            .expect("an shm endpoint");
        // boot-id/pid/socket
        let shm = shm.splitn(3, '/').nth(2).expect("an shm socket name").to_string();
        let addr = info["buffer_addr"].as_str().unwrap().trim_start_matches("0x");
        Served {
            child,
            side_channel: info["side_channel"].as_str().unwrap().to_string(),
            tcp,
            shm,
            buffer_addr: u64::from_str_radix(addr, 16).unwrap(),
        }
    }

    fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
        line[field.len()..].split_whitespace().next().unwrap().parse().unwrap()
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).unwrap().count()
    }

    /// User plus system CPU time, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5), counted from the state (field 3).
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for `cond`, at most 30 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn raise_nofile() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// An honest peer reads 4 KiB of the served buffer over TCP.
fn honest_read(served: &Served, name: &str) {
    let config = AgentConfig { shm: None, auth: AuthConfig::Secret(SECRET.into()), ..AgentConfig::new(name) };
    honest_read_with(served, config, TransportKind::Tcp);
}

/// An honest peer reads 4 KiB of the served buffer over shm; the agent is returned, so its shm
/// connection stays open (idle) until it is dropped.
fn honest_shm_read(served: &Served, name: &str) -> Agent {
    let config = AgentConfig { auth: AuthConfig::Secret(SECRET.into()), ..AgentConfig::new(name) };
    honest_read_with(served, config, TransportKind::Shm)
}

fn honest_read_with(served: &Served, config: AgentConfig, over: TransportKind) -> Agent {
    let agent = Agent::new(config).unwrap();
    let buf = Arc::new(HostBuffer::alloc(4096, &HostAllocOptions { pin: false, ..Default::default() }).unwrap());
    let _reg = agent.register(buf.clone()).unwrap();
    let deadline = Deadline::after(Duration::from_secs(30));
    let peer = agent.connect_peer(&served.side_channel, deadline).unwrap();
    let local = agent.prepare_local(&[buf.region()]).unwrap();
    let remote = MemRegion { addr: served.buffer_addr, len: 4096, kind: MemKind::Host };
    let remote = agent.prepare_remote(&peer, &[remote]).unwrap();
    let read = agent.read(&local, &[0], &remote, &[0], deadline).unwrap();
    read.wait().unwrap();
    assert_eq!(read.transport(), over);
    let mut expected = vec![0u8; 4096];
    kvferry_cli::pattern::fill(&mut expected, 3, 0);
    assert!(buf.to_vec() == expected, "the honest peer reads the served bytes");
    agent
}

/// Connect to the served shm transport's abstract socket.
fn shm_connect(served: &Served) -> UnixStream {
    UnixStream::connect_addr(&UnixAddr::from_abstract_name(&served.shm).unwrap()).unwrap()
}

#[test]
fn idle_connections_leave_the_thread_count_fixed() {
    raise_nofile();
    let served = Served::start(
        &["--max-unauthenticated", "1000", "--max-connections-per-ip", "1000", "--handshake-timeout", "120"],
        None,
    );
    honest_read(&served, "bounded-threads-warmup");
    let threads = served.status("Threads:");
    let fds = served.fds();
    let idle: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(&served.tcp).unwrap()).collect();
    // (Less a few: the warm-up peer's connections may still be closing.)
    wait_for("the 300 connections to be accepted", || served.fds() >= fds + 290);
    assert_eq!(served.status("Threads:"), threads, "300 idle connections add no thread");
    honest_read(&served, "bounded-threads-after");
    drop(idle);
}

#[test]
fn silent_connections_beyond_the_limit_are_closed_and_peers_still_served() {
    // A long handshake deadline: any connection closed early was closed for the limit.
    let served = Served::start(&["--max-unauthenticated", "16", "--handshake-timeout", "120"], None);
    let silent: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(&served.tcp).unwrap()).collect();
    let closed = |mut s: &TcpStream| {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        !matches!(s.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    wait_for("48 silent connections to be closed", || silent.iter().filter(|s| closed(s)).count() >= 48);
    // An honest peer authenticates (taking the place of a silent one) and is served.
    honest_read(&served, "bounded-honest");
    let open = silent.iter().filter(|s| !closed(s)).count();
    assert!(open <= 16, "{open} unauthenticated connections stayed open, over the limit of 16");
}

#[test]
fn idle_shm_connections_leave_the_thread_count_fixed() {
    raise_nofile();
    let served = Served::start(
        &["--max-unauthenticated", "1000", "--max-connections-per-ip", "1000", "--handshake-timeout", "120"],
        None,
    );
    // Authenticated idle connections: each honest peer keeps its shm connection after its read.
    let honest: Vec<Agent> = (0..4).map(|i| honest_shm_read(&served, &format!("bounded-shm-{i}"))).collect();
    let threads = served.status("Threads:");
    let fds = served.fds();
    // Unauthenticated ones, silent.
    let idle: Vec<UnixStream> = (0..300).map(|_| shm_connect(&served)).collect();
    wait_for("the 300 shm connections to be accepted", || served.fds() >= fds + 300);
    assert_eq!(served.status("Threads:"), threads, "300 idle shm connections add no thread");
    let after = honest_shm_read(&served, "bounded-shm-after");
    assert_eq!(served.status("Threads:"), threads, "serving one more peer adds no thread");
    drop((idle, honest, after));
}

#[test]
fn silent_shm_connections_beyond_the_limit_are_closed_and_peers_still_served() {
    let served = Served::start(&["--max-unauthenticated", "16", "--handshake-timeout", "120"], None);
    let silent: Vec<UnixStream> = (0..64).map(|_| shm_connect(&served)).collect();
    let closed = |mut s: &UnixStream| {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        !matches!(s.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    wait_for("48 silent shm connections to be closed", || silent.iter().filter(|s| closed(s)).count() >= 48);
    // An honest peer authenticates over shm (taking the place of a silent one) and is served.
    drop(honest_shm_read(&served, "bounded-shm-honest"));
    let open = silent.iter().filter(|s| !closed(s)).count();
    assert!(open <= 16, "{open} unauthenticated shm connections stayed open, over the limit of 16");
}

#[test]
fn accepting_at_the_descriptor_limit_does_not_spin() {
    let mut served = Served::start(&[], Some(64));
    let stderr = served.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let _flood: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(&served.tcp).ok()).collect();
    let backing_off = |line: &String| line.contains("accept failed");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let line =
            rx.recv_timeout(until.saturating_duration_since(Instant::now())).expect("an accept failure is logged");
        if backing_off(&line) {
            break;
        }
    }
    // Lines logged while the flood was connecting are not part of the window.
    while rx.try_recv().is_ok() {}
    // Over two seconds at the limit: a loop retrying accept at once would burn both of them.
    let before = served.cpu_ticks();
    let window = Instant::now() + Duration::from_secs(2);
    let mut lines = 0;
    while let Ok(line) = rx.recv_timeout(window.saturating_duration_since(Instant::now())) {
        lines += backing_off(&line) as usize;
    }
    let ticks = served.cpu_ticks() - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(ticks * 4 < hz, "{ticks} ticks of CPU in 2 s at the fd limit (clock {hz} Hz)");
    assert!(lines <= 4, "{lines} accept-failure lines in 2 s");
}

/// A raw TCP connection to the served transport that has proven the secret and said hello, and
/// the served buffer's key: what a hostile member holds.
fn hostile_member(served: &Served) -> (TcpStream, [u8; 16]) {
    use kvferry::auth::{Auth, Channel, Role};
    use std::io::Write;
    let auth = Auth::resolve(&AuthConfig::Secret(SECRET.into())).unwrap();
    let deadline = Deadline::after(Duration::from_secs(30));
    let metadata = kvferry::side_channel::exchange(&auth, &served.side_channel, None, deadline).unwrap();
    let metadata = kvferry::metadata::AgentMetadata::decode(&metadata).unwrap();
    let key: [u8; 16] = metadata.regions[0].key(kvferry::TransportKind::Tcp).unwrap().try_into().unwrap();
    let mut stream = TcpStream::connect(&served.tcp).unwrap();
    auth.authenticate(&mut stream, Channel::Tcp, Role::Client, deadline).unwrap();
    // hello: "KVFT" | version 1 | name length | name (the wire format of tcp/wire.rs)
    let name = b"hostile";
    let mut hello = b"KVFT".to_vec();
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&(name.len() as u16).to_le_bytes());
    hello.extend_from_slice(name);
    stream.write_all(&hello).unwrap();
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(&ack[..4], b"KVFT");
    assert_eq!(ack[6], 0, "hello accepted");
    (stream, key)
}

/// A request header and its descriptors: kind (1 read, 2 write) | 0 ×3 | count | payload length.
fn request(kind: u8, count: u32, payload_len: u64, descs: &[([u8; 16], u64, u64)]) -> Vec<u8> {
    let mut frame = vec![kind, 0, 0, 0];
    frame.extend_from_slice(&count.to_le_bytes());
    frame.extend_from_slice(&payload_len.to_le_bytes());
    for (key, addr, len) in descs {
        frame.extend_from_slice(key);
        frame.extend_from_slice(&addr.to_le_bytes());
        frame.extend_from_slice(&len.to_le_bytes());
    }
    frame
}

#[test]
fn a_trickled_write_is_cut_off_at_the_request_timeout_from_its_first_byte() {
    use std::io::Write;
    let served = Served::start(&["--request-timeout", "1"], None);
    let (mut stream, key) = hostile_member(&served);
    // WRITE of 4 KiB (past what the honest read below looks at) whose payload then arrives one
    // byte every 100 ms: 400 s at that rate.
    let write_kind = 2;
    stream.write_all(&request(write_kind, 1, 4096, &[(key, served.buffer_addr + 65536, 4096)])).unwrap();
    let started = Instant::now();
    let cut = loop {
        // The target closing shows as a hang-up long before a write fails: poll for it.
        if stream.write_all(&[0xAB]).is_err() || closed_within(&mut stream, Duration::from_millis(100)) {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the trickling WRITE is still open after 20 s");
    };
    // Absolute from the request's first byte: about the 1 s timeout, however steadily bytes came.
    assert!(cut < Duration::from_secs(10), "cut off after {cut:?}");
    honest_read(&served, "after-trickle");
}

/// Members that each send a request, then trickle the next one's header a byte a millisecond
/// (faster than a serving worker lingers for the next request) hold no more than the workers
/// that may linger: an honest peer is served meanwhile, long before any `request_timeout`.
#[test]
fn members_trickling_faster_than_the_linger_leave_a_worker_for_others() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let served = Served::start(&["--request-timeout", "60"], None);
    let stop = Arc::new(AtomicBool::new(false));
    let read_kind = 1;
    let tricklers: Vec<_> = (0..4)
        .map(|_| {
            let (mut stream, key) = hostile_member(&served);
            let ask = request(read_kind, 1, 0, &[(key, served.buffer_addr, 4096)]);
            stream.write_all(&ask).unwrap();
            let mut answer = vec![0u8; 16 + 4096];
            stream.read_exact(&mut answer).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for byte in ask.iter().cycle() {
                    if stop.load(Ordering::Relaxed) || stream.write_all(&[*byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    let started = Instant::now();
    honest_read(&served, "beside-fast-tricklers");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    tricklers.into_iter().for_each(|t| t.join().unwrap());
    assert!(took < Duration::from_secs(15), "the honest read waited {took:?} behind the tricklers");
}

/// Whether the server at the other end closed `stream`, waiting up to `wait` for it.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut probe = [0u8; 64];
    stream.set_read_timeout(Some(wait)).unwrap();
    match stream.read(&mut probe) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn a_trickled_side_channel_request_is_cut_off_at_its_deadline_from_its_first_byte() {
    use kvferry::auth::{Auth, Channel, Role};
    use std::io::Write;
    let served = Served::start(&[], None);
    let auth = Auth::resolve(&AuthConfig::Secret(SECRET.into())).unwrap();
    let mut stream = TcpStream::connect(&served.side_channel).unwrap();
    auth.authenticate(&mut stream, Channel::Exchange, Role::Client, Deadline::after(Duration::from_secs(30))).unwrap();
    // An EXCHANGE announcing 4 KiB of metadata, which then arrives one byte every 100 ms: 400 s
    // at that rate. The head: "KVFS" | version 1 | op 2 | 0 | length u32.
    let mut head = b"KVFS".to_vec();
    head.extend_from_slice(&1u16.to_le_bytes());
    head.extend_from_slice(&[2, 0]);
    head.extend_from_slice(&4096u32.to_le_bytes());
    stream.write_all(&head).unwrap();
    let started = Instant::now();
    let mut others_served = false;
    let cut = loop {
        if stream.write_all(&[0xAB]).is_err() || closed_within(&mut stream, Duration::from_millis(100)) {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(40), "the trickling request is still open after 40 s");
        // Meanwhile the side channel answers others.
        if !others_served && started.elapsed() > Duration::from_secs(2) {
            let deadline = Deadline::after(Duration::from_secs(5));
            kvferry::side_channel::exchange(&auth, &served.side_channel, None, deadline).unwrap();
            others_served = true;
        }
    };
    assert!(others_served, "the trickling request was cut off before another client was served");
    // The side channel answers a request within 10 s of its first byte, however steadily the
    // bytes come.
    assert!(cut >= Duration::from_secs(9), "cut off after {cut:?}, before the deadline");
    assert!(cut < Duration::from_secs(14), "cut off after {cut:?}, well past the 10 s deadline");
    honest_read(&served, "after-side-channel-trickle");
}

#[test]
fn headers_announcing_many_descriptors_commit_no_memory_before_the_bytes_arrive() {
    use std::io::Write;
    raise_nofile();
    let served = Served::start(&[], None);
    let rss_before = served.status("VmRSS:");
    // 200 members each announce 65,536 descriptors (2 MiB of them) and send none.
    let streams: Vec<TcpStream> = (0..200)
        .map(|_| {
            let (mut stream, _) = hostile_member(&served);
            stream.write_all(&request(1, 1 << 16, 0, &[])).unwrap();
            stream
        })
        .collect();
    // Once every header has been read (the connections are served), memory must not have grown
    // by what they announced (400 MiB) but stay within the transport's request budget (64 MiB).
    std::thread::sleep(Duration::from_millis(500));
    let grown_kib = served.status("VmRSS:").saturating_sub(rss_before);
    assert!(grown_kib < 96 * 1024, "RSS grew by {grown_kib} KiB for 200 empty headers");
    honest_read(&served, "after-headers");
    drop(streams);
}

#[test]
fn three_thousand_idle_connections_and_five_hundred_exchanges_cost_no_thread() {
    raise_nofile();
    let served = Served::start(
        &["--max-unauthenticated", "4000", "--max-connections-per-ip", "4000", "--handshake-timeout", "120"],
        None,
    );
    honest_read(&served, "bounded-many-warmup");
    let (threads, fds, rss_kib) = (served.status("Threads:"), served.fds(), served.status("VmRSS:"));
    let idle: Vec<TcpStream> = (0..3000).map(|_| TcpStream::connect(&served.tcp).unwrap()).collect();
    wait_for("the 3000 connections to be accepted", || served.fds() >= fds + 2990);
    // 500 members exchange metadata under fresh names: each becomes a peer of the served agent.
    let auth = kvferry::Auth::resolve(&AuthConfig::Secret(SECRET.into())).unwrap();
    for i in 0..500 {
        let md = kvferry::metadata::AgentMetadata {
            name: format!("exchanged-{i}"),
            generation: 1,
            endpoints: vec![kvferry::transport::Endpoint { kind: TransportKind::Tcp, address: "127.0.0.1:9".into() }],
            regions: vec![],
        };
        let deadline = Deadline::after(Duration::from_secs(30));
        kvferry::side_channel::exchange(&auth, &served.side_channel, Some(&md.encode()), deadline).unwrap();
    }
    let (threads_after, fds_after, rss_after) = (served.status("Threads:"), served.fds(), served.status("VmRSS:"));
    eprintln!(
        "kvferry serve: {threads} → {threads_after} threads, {fds} → {fds_after} fds, {rss_kib} → {rss_after} KiB \
         after 3000 idle connections and 500 exchanges"
    );
    assert_eq!(threads_after, threads, "connections and exchanged peers add no thread");
    // One descriptor per open connection; the exchanges' own connections are closed.
    assert!(fds_after <= fds + 3000 + 16, "{fds} → {fds_after} descriptors");
    assert!(rss_after.saturating_sub(rss_kib) < 64 * 1024, "RSS grew from {rss_kib} to {rss_after} KiB");
    honest_read(&served, "bounded-many-after");
    drop(idle);
}
