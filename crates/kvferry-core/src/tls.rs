//! Optional TLS (rustls, ring provider) for the side channel and the TCP transport.
//!
//! With [`TlsConfig`] set, every connection on those channels is wrapped in TLS right after the TCP
//! connect or accept, and the cluster-secret handshake ([`crate::auth`]) then runs inside it: TLS
//! gives confidentiality and integrity on the path, the secret still decides who is a member. An
//! agent with TLS refuses a peer without it, and says so (see [`crate::auth`]'s `TLS_REQUIRED`).
//!
//! `PeerStream` is the socket both channels speak through: plain, or TLS over it. Every blocking
//! call stays bounded by an absolute deadline (the socket's timeout is set again from the time left
//! before every system call, TLS records included), and shutting the socket down from another
//! thread still cuts a call off.

use std::cell::Cell;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::net::{DeadlineStream, EventListener, Peer, ServeStream, time_left};

/// The content type of the record that opens every TLS connection (RFC 8446, 5.1).
const TLS_HANDSHAKE_RECORD: u8 = 22;

/// TLS for the side channel and the TCP transport, as configured. Off unless set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// This agent's certificate chain (PEM, leaf first): presented when serving, and as the client
    /// certificate when connecting (so mutual TLS needs nothing more).
    pub cert: PathBuf,
    /// The private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The certificate authorities that sign peers' certificates (PEM bundle).
    pub ca: PathBuf,
    /// Refuse clients that present no certificate signed by `ca` (mutual TLS).
    pub require_client_cert: bool,
    /// The name a server's certificate must carry; `None`: the host of the endpoint dialled (a
    /// DNS name or an IP address).
    pub server_name: Option<String>,
}

impl TlsConfig {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig { cert: cert.into(), key: key.into(), ca: ca.into(), require_client_cert: false, server_name: None }
    }
}

/// A loaded [`TlsConfig`]: the rustls configurations both roles use.
pub(crate) struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    mutual: bool,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

fn pem_error(what: &str, path: &Path, e: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("tls: reading the {what} from {}: {e}", path.display()))
}

impl Tls {
    pub fn load(config: &TlsConfig) -> Result<Tls> {
        let certs = CertificateDer::pem_file_iter(&config.cert)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| pem_error("certificate chain", &config.cert, e))?;
        if certs.is_empty() {
            return Err(pem_error("certificate chain", &config.cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| pem_error("private key", &config.key, e))?;
        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&config.ca)
            .and_then(|cas| cas.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| pem_error("CA bundle", &config.ca, e))?;
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err(pem_error("CA bundle", &config.ca, "no usable CA certificate in the file"));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let invalid = |what: &str, e: rustls::Error| Error::InvalidArgument(format!("tls: {what}: {e}"));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("protocol versions", e))?;
        let server = match config.require_client_cert {
            true => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .build()
                        .map_err(|e| Error::InvalidArgument(format!("tls: the client certificate verifier: {e}")))?;
                server.with_client_cert_verifier(verifier)
            }
            false => server.with_no_client_auth(),
        }
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| invalid("the certificate and key", e))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("protocol versions", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| invalid("the client certificate and key", e))?;
        let server_name = match &config.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| Error::InvalidArgument(format!("tls: server name {name:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Tls { server: Arc::new(server), client: Arc::new(client), server_name, mutual: config.require_client_cert })
    }

    /// What `kvferry info` shows.
    pub fn describe(&self) -> String {
        let name = match &self.server_name {
            Some(name) => format!("server name {}", name.to_str()),
            None => "server name from the endpoint's host".to_string(),
        };
        let clients = if self.mutual { "client certificates required" } else { "client certificates optional" };
        format!("on (rustls, TLS 1.2/1.3; {clients}; {name})")
    }

    /// The name to verify a server by, for the endpoint `addr` (`host:port`).
    fn name_for(&self, addr: &str) -> io::Result<ServerName<'static>> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tls: {host:?} is not a name to verify a server by: {e}"),
            )
        })
    }
}

/// A connection of the side channel or the TCP transport: the socket, and TLS over it when the
/// agent uses TLS.
pub(crate) struct PeerStream {
    sock: TcpStream,
    tls: Option<Box<Connection>>,
    /// The deadline the last [`DeadlineStream::set_timeouts`] stood for: TLS reads and writes
    /// several records per call, and each system call's timeout is set again from it.
    until: Cell<Option<Deadline>>,
    /// What a plain stream's socket timeouts were last set to: see [`ARM_SLACK`].
    armed: Cell<Option<Duration>>,
}

/// How far past its deadline one blocking call on a plain stream may run. Setting both socket
/// timeouts costs two system calls, and a request makes several calls within microseconds: the
/// timeouts are set again only when the armed ones would overshoot the deadline by more than this
/// or end before it.
const ARM_SLACK: Duration = Duration::from_millis(1);

/// Raised by a TLS failure that is about trust (a certificate, a peer without TLS), rather than
/// the connection: callers map it to `Unauthenticated`.
fn refused(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.into())
}

fn tls_error(e: rustls::Error) -> io::Error {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::AlertReceived(_)
        | rustls::Error::PeerIncompatible(_) => refused(format!("tls: {e}")),
        other => io::Error::new(io::ErrorKind::InvalidData, format!("tls: {other}")),
    }
}

impl PeerStream {
    pub fn plain(sock: TcpStream) -> PeerStream {
        PeerStream { sock, tls: None, until: Cell::new(None), armed: Cell::new(None) }
    }

    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Connect TLS as the client to the server at `addr`, by `deadline`.
    pub fn connect_tls(sock: TcpStream, tls: &Tls, addr: &str, deadline: Deadline) -> io::Result<PeerStream> {
        let name = tls.name_for(addr)?;
        let conn = ClientConnection::new(tls.client.clone(), name).map_err(tls_error)?;
        let mut stream = PeerStream {
            sock,
            tls: Some(Box::new(conn.into())),
            until: Cell::new(Some(deadline)),
            armed: Cell::new(None),
        };
        stream.handshake(deadline)?;
        Ok(stream)
    }

    /// Accept TLS as the server on this (plain) stream, by `deadline`. A client that speaks
    /// kvferry's plain handshake instead is reported as such (`Ok(false)`), so that it can be told
    /// TLS is required in words it understands.
    pub fn accept_tls(&mut self, tls: &Tls, deadline: Deadline) -> io::Result<bool> {
        if self.peer_speaks_plain(deadline)? {
            return Ok(false);
        }
        let conn = ServerConnection::new(tls.server.clone()).map_err(tls_error)?;
        self.tls = Some(Box::new(conn.into()));
        self.until.set(Some(deadline));
        self.handshake(deadline)?;
        Ok(true)
    }

    /// Whether the first byte waiting starts anything but a TLS handshake record (type 22): a peer
    /// speaking the plain handshake, which the layer above answers in its own words.
    fn peer_speaks_plain(&self, deadline: Deadline) -> io::Result<bool> {
        let mut first = [0u8; 1];
        self.armed.set(None);
        loop {
            self.sock.set_read_timeout(Some(time_left(deadline)?))?;
            match self.sock.peek(&mut first) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => return Ok(first[0] != TLS_HANDSHAKE_RECORD),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn handshake(&mut self, deadline: Deadline) -> io::Result<()> {
        let client = matches!(self.tls.as_deref(), Some(Connection::Client(_)));
        let mut first_read = true;
        loop {
            let tls = self.tls.as_deref_mut().expect("a TLS stream");
            if !tls.is_handshaking() {
                break;
            }
            if tls.wants_write() {
                self.flush_tls()?;
                continue;
            }
            if client && first_read {
                // A server without TLS answers our ClientHello with its plain handshake.
                first_read = false;
                if self.peer_speaks_plain(deadline)? {
                    return Err(refused("the peer does not use TLS, and this agent requires it"));
                }
            }
            self.read_records(Blocking::Until)?;
        }
        self.flush_tls()
    }

    /// The socket timeout for the next system call, from the stored deadline.
    fn rearm(&self, read: bool) -> io::Result<()> {
        let Some(until) = self.until.get() else { return Ok(()) };
        let left = time_left(until)?;
        match read {
            true => self.sock.set_read_timeout(Some(left)),
            false => self.sock.set_write_timeout(Some(left)),
        }
    }

    /// Send every TLS record rustls holds, each system call bounded by the stored deadline.
    fn flush_tls(&mut self) -> io::Result<()> {
        loop {
            let wants = self.tls.as_deref().is_some_and(|t| t.wants_write());
            if !wants {
                return Ok(());
            }
            self.rearm(false)?;
            let tls = self.tls.as_deref_mut().expect("checked above");
            match tls.write_tls(&mut &self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Read TLS records from the socket (once) and decrypt them. `Ok(0)`: end of file.
    fn read_records(&mut self, how: Blocking) -> io::Result<usize> {
        let n = loop {
            let tls = self.tls.as_deref_mut().expect("a TLS stream");
            let read = match how {
                Blocking::Until => {
                    let Some(until) = self.until.get() else { unreachable!("TLS streams always carry a deadline") };
                    self.sock.set_read_timeout(Some(time_left(until)?))?;
                    tls.read_tls(&mut &self.sock)
                }
                Blocking::Never => tls.read_tls(&mut NoWait(&self.sock)),
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        let tls = self.tls.as_deref_mut().expect("a TLS stream");
        if let Err(e) = tls.process_new_packets() {
            // rustls queued an alert saying why; the peer may as well learn it.
            let _ = self.flush_tls();
            return Err(tls_error(e));
        }
        // A key update or session ticket to answer.
        self.flush_tls()?;
        Ok(n)
    }

    /// Read what has arrived without blocking: `Ok(0)` is end of file, `WouldBlock` nothing yet
    /// (and then nothing is buffered either, so the socket's readiness tells when there is more).
    /// `deadline` bounds what TLS may have to send meanwhile (a key update's answer).
    pub fn recv_ready(&mut self, buf: &mut [u8], deadline: Deadline) -> io::Result<usize> {
        if self.tls.is_none() {
            return crate::net::recv_ready(&self.sock, buf);
        }
        self.until.set(Some(deadline));
        loop {
            let tls = self.tls.as_deref_mut().expect("checked above");
            match tls.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                other => return other,
            }
            if self.read_records(Blocking::Never)? == 0 {
                // End of file: the reader now says so (cleanly or not).
                let tls = self.tls.as_deref_mut().expect("checked above");
                return match tls.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                    Err(e) => Err(e),
                };
            }
        }
    }

    /// Read TLS plaintext into `bufs`, blocking by the stored deadline.
    ///
    /// This is where TLS costs the zero-copy path one copy: rustls decrypts each record into its
    /// own buffer, and the reader copies the plaintext from there straight into `bufs` (registered
    /// memory, for a payload), with no buffer of ours in between.
    fn read_tls_into(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        loop {
            let tls = self.tls.as_deref_mut().expect("a TLS stream");
            let mut reader = tls.reader();
            let mut got = 0;
            let mut error = None;
            for buf in bufs.iter_mut().filter(|b| !b.is_empty()) {
                match reader.read(buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        got += n;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            match error {
                _ if got > 0 => return Ok(got),
                None => return Ok(0),
                Some(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Some(e) => return Err(e),
            }
            self.read_records(Blocking::Until)?;
        }
    }

    /// Encrypt from `bufs` and send the records, blocking by the stored deadline. rustls encrypts
    /// straight from `bufs` (registered memory, for a payload) into its record buffer: the one
    /// copy TLS adds on this side. Everything accepted is on the socket before this returns, so a
    /// deadline or a cut-off ends the call with nothing left pending.
    fn write_tls_from(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let tls = self.tls.as_deref_mut().expect("a TLS stream");
        let n = tls.writer().write_vectored(bufs)?;
        self.flush_tls()?;
        Ok(n)
    }
}

#[derive(Clone, Copy)]
enum Blocking {
    /// Block until the stored deadline.
    Until,
    /// Take only what has arrived.
    Never,
}

/// A socket read that never blocks.
struct NoWait<'a>(&'a TcpStream);

impl Read for NoWait<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::net::recv_ready(self.0, buf)
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self.tls {
            None => self.sock.read_vectored(bufs),
            Some(_) => self.read_tls_into(bufs),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.tls {
            None => self.sock.write_vectored(bufs),
            Some(_) => self.write_tls_from(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.tls {
            None => Ok(()),
            Some(_) => self.flush_tls(),
        }
    }
}

impl DeadlineStream for PeerStream {
    fn set_timeouts(&self, left: Duration) -> io::Result<()> {
        self.until.set(Some(Deadline::after(left)));
        // A call started now blocks at most the armed timeout: keeping it ends the call by the
        // deadline plus the slack, and never times out before the deadline.
        if self.tls.is_none()
            && let Some(armed) = self.armed.get()
            && armed >= left
            && armed - left <= ARM_SLACK
        {
            return Ok(());
        }
        self.sock.set_read_timeout(Some(left))?;
        self.sock.set_write_timeout(Some(left))?;
        self.armed.set(self.tls.is_none().then_some(left));
        Ok(())
    }
}

impl AsRawFd for PeerStream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl ServeStream for PeerStream {}

/// A TCP listener whose connections are [`PeerStream`]s (plain until the handshake upgrades them).
pub(crate) struct PeerListener(pub TcpListener);

impl AsRawFd for PeerListener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl EventListener for PeerListener {
    type Stream = PeerStream;

    fn accept_ready(&self) -> io::Result<(PeerStream, Option<Peer>)> {
        self.0.accept().map(|(s, a)| (PeerStream::plain(s), Some(Peer::Ip(a.ip()))))
    }
}
