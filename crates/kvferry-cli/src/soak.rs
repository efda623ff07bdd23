//! `kvferry soak`: transfers between this process and `kvferry serve` children over TCP and shared
//! memory while targets are killed, stopped and restarted, transfers cancelled and registrations
//! dropped mid-flight. Every byte that arrives is checked; every byte that must not arrive (after a
//! cancel, a failure, or a dropped registration) is checked not to; threads, fds and memory are
//! reported at the start and the end. It is a benchmark of robustness, bounded in time.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvferry::memory::host::{HostAllocOptions, HostBuffer};
use kvferry::{Agent, AgentConfig, AuthConfig, Deadline, MemKind, MemRegion, Registration};
use serde::Serialize;

use crate::{pattern, units};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub seconds: f64,
    /// Target processes; even ones back their buffer with a shared memfd, odd ones with private
    /// memory (reached by cross-memory attach over shm).
    #[arg(long, default_value_t = 2)]
    pub targets: usize,
    /// Each target's buffer: the lower half holds a pattern that reads check, the upper half what
    /// this process wrote.
    #[arg(long, default_value = "16M", value_parser = units::parse_size)]
    pub buffer_size: u64,
    /// The largest transfer.
    #[arg(long, default_value = "1M", value_parser = units::parse_size)]
    pub max_transfer: u64,
    /// Seeds the choice of actions, so a run can be repeated.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Threads, descriptors and resident memory of one process.
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Resources {
    pub threads: u64,
    pub fds: u64,
    pub rss_kib: u64,
}

impl Resources {
    pub fn of(pid: u32) -> Resources {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
        Resources { threads: field("Threads:"), fds, rss_kib: field("VmRSS:") }
    }
}

/// What a run did and found. `failures` must all be zero.
#[derive(Serialize, Debug, Default)]
pub struct Report {
    pub seconds: f64,
    pub reads: u64,
    pub writes: u64,
    pub cancels: u64,
    pub deregistrations: u64,
    pub stops: u64,
    pub kills: u64,
    pub notifications: u64,
    pub bytes_checked: u64,
    /// Typed errors by code name: the expected outcome of stops, kills and cancels.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub failures: Failures,
    /// The longest a registration's drop took while a transfer into it was in flight.
    pub longest_drop_ms: f64,
    /// The longest past its deadline that a transfer to a stopped target took to fail.
    pub longest_overrun_ms: f64,
    /// This process after setting up (agents made, targets connected) and at the end.
    pub start: Resources,
    pub end: Resources,
    /// The targets that were running at the end, as they started and ended.
    pub targets: Vec<(Resources, Resources)>,
}

#[derive(Serialize, Debug, Default)]
pub struct Failures {
    /// Bytes that arrived wrong.
    pub mismatches: u64,
    /// Local memory that changed after a cancel or a failed transfer returned.
    pub bytes_after_cancel: u64,
    /// Memory that changed after its registration was dropped.
    pub bytes_after_deregistration: u64,
    /// Transfers to a healthy target that failed.
    pub unexpected_errors: u64,
    /// Transfers that ended more than a second past their deadline.
    pub late: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.mismatches + self.bytes_after_cancel + self.bytes_after_deregistration + self.unexpected_errors + self.late
    }
}

/// xorshift64*: a reproducible choice of actions, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Target {
    child: Child,
    name: String,
    side_channel: String,
    addr: u64,
    len: u64,
    seed: u64,
    /// What the upper half holds: the pattern at start, then what was written.
    upper: Vec<u8>,
    started: Resources,
}

impl Target {
    fn spawn(index: usize, generation: u64, args: &SoakArgs, secret: &str) -> anyhow::Result<Target> {
        let name = format!("soak-{index}-{generation}");
        let seed = 1000 + index as u64;
        let memory = if index.is_multiple_of(2) { "shared" } else { "private" };
        let mut child = crate::cli::self_command()?
            .args(["serve", "--buffer-size", &args.buffer_size.to_string(), "--fill-seed", &seed.to_string()])
            .args(["--memory", memory, "--name", &name])
            .env(kvferry::auth::SECRET_ENV, secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a kvferry serve child")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("the child's stdout")?).read_line(&mut line)?;
        let info: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the child said {line:?}"))?;
        let addr = info["buffer_addr"].as_str().context("buffer_addr")?.trim_start_matches("0x");
        let len = info["buffer_size"].as_u64().context("buffer_size")?;
        let mut upper = vec![0u8; (len / 2) as usize];
        pattern::fill(&mut upper, seed, len / 2);
        Ok(Target {
            started: Resources::of(child.id()),
            name,
            side_channel: info["side_channel"].as_str().context("side_channel")?.to_string(),
            addr: u64::from_str_radix(addr, 16)?,
            len,
            seed,
            upper,
            child,
        })
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn region(&self, offset: u64, len: u64) -> MemRegion {
        MemRegion { addr: self.addr + offset, len, kind: MemKind::Host }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One initiator agent with its local buffer.
struct Initiator {
    agent: Agent,
    buffer: Arc<HostBuffer>,
    registration: Option<Registration>,
}

impl Initiator {
    fn new(name: &str, shm: bool, len: usize, secret: &str) -> anyhow::Result<Initiator> {
        let mut config = AgentConfig { auth: AuthConfig::Secret(secret.as_bytes().to_vec()), ..AgentConfig::new(name) };
        if !shm {
            config.shm = None;
        }
        let agent = Agent::new(config)?;
        let buffer = Arc::new(HostBuffer::alloc(len, &HostAllocOptions { pin: false, ..Default::default() })?);
        let registration = Some(agent.register(buffer.clone())?);
        Ok(Initiator { agent, buffer, registration })
    }

    fn local(&self, offset: u64, len: u64) -> MemRegion {
        MemRegion { addr: self.buffer.as_ptr() as u64 + offset, len, kind: MemKind::Host }
    }
}

/// A fresh cluster secret for this run's processes.
fn secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

struct Soak<'a> {
    args: &'a SoakArgs,
    secret: String,
    rng: Rng,
    targets: Vec<Target>,
    generation: u64,
    initiators: Vec<Initiator>,
    report: Report,
}

const DEADLINE: Duration = Duration::from_secs(10);

impl Soak<'_> {
    fn connect_all(&mut self, target: usize) -> anyhow::Result<()> {
        for initiator in &self.initiators {
            let name = initiator.agent.connect_peer(&self.targets[target].side_channel, Deadline::after(DEADLINE))?;
            anyhow::ensure!(name == self.targets[target].name, "connected to {name}");
        }
        Ok(())
    }

    fn restart(&mut self, target: usize) -> anyhow::Result<()> {
        for initiator in &self.initiators {
            let _ = initiator.agent.remove_peer(&self.targets[target].name);
        }
        self.generation += 1;
        self.targets[target] = Target::spawn(target, self.generation, self.args, &self.secret)?;
        self.connect_all(target)
    }

    fn error(&mut self, e: &kvferry::Error, healthy: bool) {
        *self.report.errors.entry(e.code().name().to_string()).or_default() += 1;
        if healthy {
            eprintln!("kvferry soak: unexpected error: {e}");
            self.report.failures.unexpected_errors += 1;
        }
    }

    /// A random range of `len` bytes at most within `[start, end)`, 8-byte aligned.
    fn range(&mut self, start: u64, end: u64) -> (u64, u64) {
        let len = (4096 + self.rng.below(self.args.max_transfer)).min(self.args.max_transfer).min(end - start) & !7;
        let offset = start + self.rng.below((end - start - len) / 8 + 1) * 8;
        (offset, len.max(8))
    }

    fn read(
        &mut self,
        i: usize,
        t: usize,
        remote: (u64, u64),
        local_offset: u64,
        deadline: Deadline,
    ) -> kvferry::Result<kvferry::Transfer> {
        let initiator = &self.initiators[i];
        let local = initiator.agent.prepare_local(&[initiator.local(local_offset, remote.1)])?;
        let theirs =
            initiator.agent.prepare_remote(&self.targets[t].name, &[self.targets[t].region(remote.0, remote.1)])?;
        initiator.agent.read(&local, &[0], &theirs, &[0], deadline)
    }

    /// Whether `len` bytes of the target at `offset` are what the local buffer holds at `local`.
    fn check(&mut self, i: usize, t: usize, offset: u64, len: u64, local: u64) -> bool {
        let got = self.initiators[i].buffer.to_vec();
        let got = &got[local as usize..(local + len) as usize];
        let target = &self.targets[t];
        let half = target.len / 2;
        let good = if offset >= half {
            got == &target.upper[(offset - half) as usize..(offset - half + len) as usize]
        } else {
            pattern::first_mismatch(got, target.seed, offset).is_none()
        };
        self.report.bytes_checked += len;
        if !good {
            eprintln!("kvferry soak: {len} bytes at {offset} of {} arrived wrong", target.name);
            self.report.failures.mismatches += 1;
        }
        good
    }

    fn step(&mut self) -> anyhow::Result<()> {
        let i = self.rng.below(self.initiators.len() as u64) as usize;
        let t = self.rng.below(self.targets.len() as u64) as usize;
        let half = self.targets[t].len / 2;
        let max = self.args.max_transfer;
        match self.rng.below(100) {
            // A read of the pattern, checked.
            0..40 => {
                let (offset, len) = self.range(0, half);
                self.report.reads += 1;
                match self.read(i, t, (offset, len), 0, Deadline::after(DEADLINE)).and_then(|x| x.wait()) {
                    Ok(()) => {
                        self.check(i, t, offset, len, 0);
                    }
                    Err(e) => self.error(&e, true),
                }
            }
            // A write of fresh bytes into the upper half, read back and checked.
            40..65 => {
                let (offset, len) = self.range(half, 2 * half);
                let fresh: Vec<u8> = (0..len).map(|_| self.rng.next() as u8).collect();
                self.initiators[i].buffer.write_at(0, &fresh)?;
                self.report.writes += 1;
                let initiator = &self.initiators[i];
                let local = initiator.agent.prepare_local(&[initiator.local(0, len)])?;
                let theirs =
                    initiator.agent.prepare_remote(&self.targets[t].name, &[self.targets[t].region(offset, len)])?;
                match initiator
                    .agent
                    .write(&local, &[0], &theirs, &[0], Deadline::after(DEADLINE))
                    .and_then(|x| x.wait())
                {
                    Ok(()) => {
                        // The source is where cancelled reads land: a late byte from one of them
                        // would change what was written, and is told apart from a wrong write.
                        if self.initiators[i].buffer.to_vec()[..len as usize] != fresh[..] {
                            eprintln!("kvferry soak: bytes landed in a write's source after an earlier cancel");
                            self.report.failures.bytes_after_cancel += 1;
                            return self.restart(t);
                        }
                        let at = (offset - half) as usize;
                        self.targets[t].upper[at..at + len as usize].copy_from_slice(&fresh);
                        match self.read(i, t, (offset, len), max, Deadline::after(DEADLINE)).and_then(|x| x.wait()) {
                            Ok(()) => {
                                self.check(i, t, offset, len, max);
                            }
                            Err(e) => self.error(&e, true),
                        }
                    }
                    Err(e) => {
                        self.error(&e, true);
                        // What landed is unknown now: start that target afresh.
                        self.restart(t)?;
                    }
                }
            }
            // A read cancelled at a random point: once cancel returns, nothing lands.
            65..75 => {
                self.report.cancels += 1;
                let transfer = self.read(i, t, (0, max.min(half)), 0, Deadline::after(DEADLINE))?;
                let _ = transfer.wait_until(Deadline::after(Duration::from_micros(self.rng.below(2000))));
                transfer.cancel();
                let snapshot = self.initiators[i].buffer.to_vec();
                // Let time pass with other traffic, then look again.
                let (offset, len) = self.range(0, half);
                if let Ok(()) = self.read(i, t, (offset, len), max, Deadline::after(DEADLINE)).and_then(|x| x.wait()) {
                    self.check(i, t, offset, len, max);
                }
                let after = self.initiators[i].buffer.to_vec();
                let outcome = transfer.wait();
                if after[..max as usize] != snapshot[..max as usize] {
                    let changed = (0..max as usize).filter(|&b| after[b] != snapshot[b]).count();
                    eprintln!(
                        "kvferry soak: {changed} bytes landed after cancel returned ({} to {} over {}, {:?}, {outcome:?})",
                        self.initiators[i].agent.name(),
                        self.targets[t].name,
                        transfer.transport(),
                        transfer.mode(),
                    );
                    self.report.failures.bytes_after_cancel += 1;
                }
                if let Err(e) = outcome {
                    *self.report.errors.entry(e.code().name().to_string()).or_default() += 1;
                }
            }
            // A registration dropped while a read into it runs: once the drop returns, nothing lands.
            75..80 => {
                self.report.deregistrations += 1;
                let transfer = self.read(i, t, (0, max.min(half)), 0, Deadline::after(DEADLINE))?;
                let started = Instant::now();
                drop(self.initiators[i].registration.take());
                let took = started.elapsed().as_secs_f64() * 1e3;
                self.report.longest_drop_ms = self.report.longest_drop_ms.max(took);
                let old = self.initiators[i].buffer.clone();
                let snapshot = old.to_vec();
                let _ = transfer.wait();
                let fresh =
                    Arc::new(HostBuffer::alloc(old.len(), &HostAllocOptions { pin: false, ..Default::default() })?);
                self.initiators[i].registration = Some(self.initiators[i].agent.register(fresh.clone())?);
                self.initiators[i].buffer = fresh;
                let (offset, len) = self.range(0, half);
                if let Ok(()) = self.read(i, t, (offset, len), 0, Deadline::after(DEADLINE)).and_then(|x| x.wait()) {
                    self.check(i, t, offset, len, 0);
                }
                if old.to_vec() != snapshot {
                    eprintln!("kvferry soak: bytes landed after a registration was dropped");
                    self.report.failures.bytes_after_deregistration += 1;
                }
            }
            // A stopped target: the transfer fails by its deadline, not later.
            80..87 => {
                self.report.stops += 1;
                self.targets[t].signal(libc::SIGSTOP);
                let deadline = Deadline::after(Duration::from_millis(300));
                let result = self.read(i, t, (0, max.min(half)), 0, deadline).and_then(|x| x.wait());
                let overrun = Instant::now().saturating_duration_since(deadline.instant());
                self.targets[t].signal(libc::SIGCONT);
                self.report.longest_overrun_ms = self.report.longest_overrun_ms.max(overrun.as_secs_f64() * 1e3);
                if overrun > Duration::from_secs(1) {
                    self.report.failures.late += 1;
                }
                match result {
                    Ok(()) => {
                        self.check(i, t, 0, max.min(half), 0);
                    }
                    Err(e) => self.error(&e, false),
                }
            }
            // A target killed with a read in flight, then started again.
            87..92 => {
                self.report.kills += 1;
                let transfer = self.read(i, t, (0, max.min(half)), 0, Deadline::after(DEADLINE))?;
                self.targets[t].signal(libc::SIGKILL);
                let result = transfer.wait();
                let overrun = transfer.elapsed().unwrap_or_default();
                if overrun > DEADLINE + Duration::from_secs(1) {
                    self.report.failures.late += 1;
                }
                match result {
                    Ok(()) => {
                        self.check(i, t, 0, max.min(half), 0);
                    }
                    Err(e) => self.error(&e, false),
                }
                self.restart(t)?;
            }
            _ => {
                self.report.notifications += 1;
                let initiator = &self.initiators[i];
                let sent = initiator
                    .agent
                    .notify(&self.targets[t].name, b"soak", Deadline::after(DEADLINE))
                    .and_then(|x| x.wait());
                if let Err(e) = sent {
                    self.error(&e, true);
                }
            }
        }
        Ok(())
    }
}

pub fn run(args: &SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.targets > 0, "--targets must be at least 1");
    anyhow::ensure!(args.buffer_size >= 2 * args.max_transfer, "--buffer-size must be at least twice --max-transfer");
    let report = soak(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report:#?}");
    }
    anyhow::ensure!(report.failures.total() == 0, "the soak found {} failures", report.failures.total());
    Ok(())
}

pub fn soak(args: &SoakArgs) -> anyhow::Result<Report> {
    let secret = secret()?;
    let local_len = 2 * args.max_transfer as usize;
    let initiators = vec![
        Initiator::new("soak-tcp", false, local_len, &secret)?,
        Initiator::new("soak-shm", true, local_len, &secret)?,
    ];
    let targets = (0..args.targets).map(|i| Target::spawn(i, 0, args, &secret)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut soak = Soak {
        args,
        secret,
        rng: Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        targets,
        generation: 0,
        initiators,
        report: Report::default(),
    };
    for t in 0..args.targets {
        soak.connect_all(t)?;
    }
    // After setting up, so that growth from here on is what the run cost.
    soak.report.start = Resources::of(std::process::id());
    let began = Instant::now();
    let until = began + Duration::from_secs_f64(args.seconds);
    while Instant::now() < until {
        soak.step()?;
    }
    soak.report.seconds = began.elapsed().as_secs_f64();
    soak.report.targets = soak.targets.iter().map(|t| (t.started, Resources::of(t.child.id()))).collect();
    soak.report.end = Resources::of(std::process::id());
    Ok(soak.report)
}
