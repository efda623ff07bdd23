//! Peer authentication: every connection, on every channel, starts by proving the cluster secret
//! in both directions before anything else is said.
//!
//! ```text
//! client → server  "KVFA" | version u8 | scheme u8 | channel u8 | 0u8 | client nonce [32]
//! server → client  "KVFA" | version u8 | scheme u8 | verdict u8 | 0u8 | server nonce [32] | server proof [32]
//! client → server  client proof [32]                                  (scheme hmac only)
//! server → client  verdict u8                                         (scheme hmac only)
//!
//! proof = HMAC-SHA256(key, role | channel | client nonce | server nonce)
//! key   = HMAC-SHA256("kvferry cluster secret v1", secret)
//! ```
//!
//! Both nonces are fresh random bytes per connection, so a recorded exchange proves nothing on a
//! later one (replay), and the two roles sign different labels, so a server's proof cannot be
//! reflected back to it as a client's. The server proves itself first: a client never sends
//! metadata (which carries keys) to an endpoint that does not hold the secret. Authentication
//! proves membership of the cluster, not a name: any holder of the secret may claim any agent name.
//! Without TLS the bytes after the handshake are neither encrypted nor integrity-protected, so an
//! attacker on the path (not merely one who can connect) can still read or alter them; with TLS
//! ([`crate::tls`]) the side channel and the TCP transport run this handshake inside it.

use std::fmt;
use std::io;
use std::sync::{Arc, OnceLock};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::net::DeadlineStream;
use crate::tls::{PeerStream, Tls, TlsConfig};
use crate::transport::error::TransferError;

pub(crate) const MAGIC: [u8; 4] = *b"KVFA";
const VERSION: u8 = 1;
const SCHEME_NONE: u8 = 0;
const SCHEME_HMAC: u8 = 1;
const VERDICT_OK: u8 = 0;
/// The server requires the cluster secret and the client offered none.
const VERDICT_REQUIRED: u8 = 1;
/// The client's proof did not verify.
const VERDICT_REFUSED: u8 = 2;
/// The server does not speak the client's handshake version (or protocol).
const VERDICT_VERSION: u8 = 3;
/// The server uses TLS, and the client came without it.
const VERDICT_TLS_REQUIRED: u8 = 4;
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
const HELLO_LEN: usize = 8 + NONCE_LEN;
const ANSWER_LEN: usize = 8 + NONCE_LEN + PROOF_LEN;
/// Sealed values: magic, then a random nonce, then ChaCha20-Poly1305 ciphertext and tag.
#[cfg(feature = "etcd")]
const SEAL_MAGIC: [u8; 4] = *b"KVFE";
#[cfg(feature = "etcd")]
const SEAL_NONCE_LEN: usize = 12;
/// The shortest secret accepted: 128 bits.
pub const MIN_SECRET_LEN: usize = 16;
/// The environment variable holding the cluster secret.
pub const SECRET_ENV: &str = "KVFERRY_SECRET";
/// The environment variable naming a file that holds the cluster secret.
pub const SECRET_FILE_ENV: &str = "KVFERRY_SECRET_FILE";
/// Set to `none` to turn authentication off explicitly (a closed network).
pub const AUTH_ENV: &str = "KVFERRY_AUTH";

/// The channel a handshake opens, bound into the proofs so that one channel's exchange cannot be
/// replayed on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// The side channel's metadata exchange.
    Exchange = 1,
    Tcp = 2,
    Shm = 3,
    /// A front end's own exchange over a socket it opened (see [`Auth::authenticate`]).
    Engine = 4,
}

/// Which end of a connection this side is, for [`Auth::authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connected: proves itself after the other side has.
    Client,
    /// Accepted: proves itself first.
    Server,
}

/// How an agent authenticates its peers, as configured.
#[derive(Clone, Default)]
pub enum AuthConfig {
    /// [`SECRET_ENV`] or [`SECRET_FILE_ENV`]; [`AUTH_ENV`]`=none` for none; and with neither, a
    /// random secret made once per process, so agents of one process (the embedded benchmark) work
    /// with no configuration while agents of different processes must share a configured secret.
    #[default]
    FromEnv,
    /// This secret (at least [`MIN_SECRET_LEN`] bytes).
    Secret(Vec<u8>),
    /// No authentication: anyone who reaches an endpoint is a peer. Only for closed networks.
    Disabled,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthConfig::FromEnv => f.write_str("FromEnv"),
            AuthConfig::Secret(_) => f.write_str("Secret(..)"),
            AuthConfig::Disabled => f.write_str("Disabled"),
        }
    }
}

/// What an agent's channels use: the derived key, or nothing.
#[derive(Clone)]
pub struct Auth {
    key: Option<Arc<[u8; 32]>>,
    source: &'static str,
    /// TLS for the side channel and the TCP transport, when configured.
    tls: Option<Arc<Tls>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("source", &self.source).finish_non_exhaustive()
    }
}

fn derive(secret: &[u8]) -> Arc<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"kvferry cluster secret v1").expect("HMAC takes any key");
    mac.update(secret);
    Arc::new(mac.finalize().into_bytes().into())
}

fn check_len(secret: &[u8], from: &str) -> Result<()> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(Error::InvalidArgument(format!(
            "the cluster secret from {from} has {} bytes; at least {MIN_SECRET_LEN} are needed",
            secret.len()
        )));
    }
    Ok(())
}

impl Auth {
    /// Resolve a configuration (reading the environment for [`AuthConfig::FromEnv`]).
    pub fn resolve(config: &AuthConfig) -> Result<Auth> {
        match config {
            AuthConfig::Secret(secret) => {
                check_len(secret, "the configuration")?;
                Ok(Auth { key: Some(derive(secret)), source: "configured secret", tls: None })
            }
            AuthConfig::Disabled => Ok(Auth::disabled()),
            AuthConfig::FromEnv => Auth::from_env(),
        }
    }

    fn from_env() -> Result<Auth> {
        if let Ok(mode) = std::env::var(AUTH_ENV) {
            match mode.as_str() {
                "none" => return Ok(Auth::disabled()),
                "secret" | "" => {}
                other => {
                    return Err(Error::InvalidArgument(format!("{AUTH_ENV}={other}: expected `none` or `secret`")));
                }
            }
        }
        if let Some(secret) = std::env::var_os(SECRET_ENV) {
            let secret = secret.as_encoded_bytes();
            check_len(secret, SECRET_ENV)?;
            return Ok(Auth { key: Some(derive(secret)), source: "KVFERRY_SECRET", tls: None });
        }
        if let Some(path) = std::env::var_os(SECRET_FILE_ENV) {
            let secret = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading the cluster secret from {}", path.to_string_lossy()), e))?;
            let secret = secret.trim_ascii_end();
            check_len(secret, SECRET_FILE_ENV)?;
            return Ok(Auth { key: Some(derive(secret)), source: "KVFERRY_SECRET_FILE", tls: None });
        }
        Ok(Auth::process())
    }

    /// The random secret of this process.
    fn process() -> Auth {
        static KEY: OnceLock<Arc<[u8; 32]>> = OnceLock::new();
        let key = KEY.get_or_init(|| {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).expect("the OS random source failed");
            derive(&secret)
        });
        Auth {
            key: Some(key.clone()),
            source: "a random secret of this process: only its own agents can be its peers",
            tls: None,
        }
    }

    pub fn disabled() -> Auth {
        Auth { key: None, source: "disabled", tls: None }
    }

    /// The same, with TLS on the side channel and the TCP transport.
    pub fn with_tls(self, config: &TlsConfig) -> Result<Auth> {
        Ok(Auth { tls: Some(Arc::new(Tls::load(config)?)), ..self })
    }

    /// What TLS this agent uses, for `kvferry info`: `None` when off.
    pub fn tls(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.describe())
    }

    /// Open a channel to the server at `addr` (`host:port`) over `sock`, just connected: TLS when
    /// configured, then the cluster-secret handshake inside it, all by `deadline`.
    pub(crate) fn connect_stream(
        &self,
        sock: std::net::TcpStream,
        addr: &str,
        channel: Channel,
        deadline: Deadline,
    ) -> std::result::Result<PeerStream, AuthError> {
        let mut stream = match &self.tls {
            Some(tls) => PeerStream::connect_tls(sock, tls, addr, deadline).map_err(AuthError::from_tls)?,
            None => PeerStream::plain(sock),
        };
        self.client(&mut stream, channel, deadline)?;
        Ok(stream)
    }

    /// Serve the opening of a channel on `stream`, just accepted: TLS when configured (a client
    /// without it is told it is required), then the cluster-secret handshake, by `deadline`.
    pub(crate) fn accept_stream(
        &self,
        stream: &mut PeerStream,
        channel: Channel,
        deadline: Deadline,
    ) -> std::result::Result<(), AuthError> {
        if let Some(tls) = &self.tls
            && !stream.accept_tls(tls, deadline).map_err(AuthError::from_tls)?
        {
            // Its plain hello first, so that closing leaves nothing unread (which would reset the
            // connection before the client reads why).
            let mut hello = [0u8; HELLO_LEN];
            if stream.read_exact_by(&mut hello, deadline).is_ok() {
                let mut answer = [0u8; ANSWER_LEN];
                answer[..4].copy_from_slice(&MAGIC);
                answer[4] = VERSION;
                answer[5] = self.scheme();
                answer[6] = VERDICT_TLS_REQUIRED;
                let _ = stream.write_all_by(&answer, deadline);
            }
            return Err(AuthError::Refused("the client does not use TLS, and this agent requires it".into()));
        }
        self.server(stream, channel, deadline)
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Where the secret came from, for `kvferry info` and logs (never the secret).
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Run the handshake of `channel` on a connected TCP socket, by `deadline`: for a front end's
    /// own protocol ([`Channel::Engine`]: the vLLM connector's engine side channel, which hands out
    /// agent metadata), or a client of kvferry's own wire formats. The socket must be in blocking
    /// mode; its timeouts are changed.
    pub fn authenticate(
        &self,
        stream: &mut std::net::TcpStream,
        channel: Channel,
        role: Role,
        deadline: Deadline,
    ) -> Result<()> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "an unknown peer".into());
        match role {
            Role::Client => self.client(stream, channel, deadline),
            Role::Server => self.server(stream, channel, deadline),
        }
        .map_err(|e| e.into_error(&peer))
    }

    /// Seal `data` for storage others can read (etcd): encrypted and authenticated under a key
    /// derived from the secret, bound to `label` (the storage key, so a value cannot be moved under
    /// another name). Without authentication the data is stored as it is.
    #[cfg(feature = "etcd")]
    pub(crate) fn seal(&self, label: &[u8], data: &[u8]) -> Vec<u8> {
        use chacha20poly1305::aead::{Aead, Payload};
        let Some(cipher) = self.cipher() else { return data.to_vec() };
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source failed");
        let sealed = cipher
            .encrypt(&nonce.into(), Payload { msg: data, aad: label })
            .expect("ChaCha20-Poly1305 seals any message that fits in memory");
        [&SEAL_MAGIC[..], &nonce, &sealed].concat()
    }

    /// The data [`seal`](Self::seal) sealed under `label`; an error says why it is not ours.
    #[cfg(feature = "etcd")]
    pub(crate) fn open(&self, label: &[u8], sealed: &[u8]) -> std::result::Result<Vec<u8>, String> {
        use chacha20poly1305::aead::{Aead, Payload};
        let Some(cipher) = self.cipher() else { return Ok(sealed.to_vec()) };
        let body = sealed
            .strip_prefix(&SEAL_MAGIC[..])
            .filter(|body| body.len() >= SEAL_NONCE_LEN)
            .ok_or("the value is not sealed with a cluster secret")?;
        let (nonce, ciphertext) = body.split_at(SEAL_NONCE_LEN);
        let nonce: [u8; SEAL_NONCE_LEN] = nonce.try_into().expect("split at the nonce length");
        cipher
            .decrypt(&nonce.into(), Payload { msg: ciphertext, aad: label })
            .map_err(|_| "the value was not sealed with this cluster's secret (or was altered)".to_string())
    }

    #[cfg(feature = "etcd")]
    fn cipher(&self) -> Option<chacha20poly1305::ChaCha20Poly1305> {
        let key = self.key.as_ref()?;
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key[..]).expect("HMAC takes any key");
        mac.update(b"kvferry sealed values v1");
        let sealing_key: [u8; 32] = mac.finalize().into_bytes().into();
        Some(<chacha20poly1305::ChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&sealing_key.into()))
    }

    /// A value derived from the cluster key for `label` over `parts`, each length-prefixed so that
    /// no two lists of parts give the same input; `None` without authentication.
    #[cfg(feature = "fabric")]
    pub(crate) fn derive(&self, label: &[u8], parts: &[&[u8]]) -> Option<[u8; 32]> {
        let key = self.key.as_ref()?;
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key[..]).expect("HMAC takes any key");
        mac.update(label);
        for part in parts {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        Some(mac.finalize().into_bytes().into())
    }

    fn proof(&self, role: &[u8], channel: Channel, client: &[u8], server: &[u8]) -> Hmac<Sha256> {
        let key = self.key.as_ref().expect("proofs are computed with a key");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key[..]).expect("HMAC takes any key");
        mac.update(role);
        mac.update(&[channel as u8]);
        mac.update(client);
        mac.update(server);
        mac
    }

    fn scheme(&self) -> u8 {
        if self.enabled() { SCHEME_HMAC } else { SCHEME_NONE }
    }

    /// Prove ourselves to the server at the other end of `stream` and check its proof.
    pub(crate) fn client<S: DeadlineStream>(
        &self,
        stream: &mut S,
        channel: Channel,
        deadline: Deadline,
    ) -> std::result::Result<(), AuthError> {
        let client_nonce = nonce()?;
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4] = VERSION;
        hello[5] = self.scheme();
        hello[6] = channel as u8;
        hello[8..].copy_from_slice(&client_nonce);
        stream.write_all_by(&hello, deadline)?;
        let mut answer = [0u8; ANSWER_LEN];
        stream.read_exact_by(&mut answer, deadline)?;
        if answer[..4] != MAGIC {
            return Err(AuthError::Protocol("the endpoint does not speak kvferry's handshake".into()));
        }
        match answer[6] {
            VERDICT_OK => {}
            VERDICT_REQUIRED => return Err(AuthError::Refused("the peer requires the cluster secret".into())),
            VERDICT_TLS_REQUIRED => {
                return Err(AuthError::Refused("the peer requires TLS, and this agent does not use it".into()));
            }
            VERDICT_VERSION => {
                return Err(AuthError::Protocol(format!("the peer speaks handshake version {}", answer[4])));
            }
            other => return Err(AuthError::Protocol(format!("unknown handshake verdict {other}"))),
        }
        match (self.enabled(), answer[5]) {
            (false, _) => return Ok(()),
            (true, SCHEME_HMAC) => {}
            (true, _) => {
                return Err(AuthError::Refused("the peer does not authenticate, and this agent requires it".into()));
            }
        }
        let server_nonce = &answer[8..8 + NONCE_LEN];
        let server_proof = &answer[8 + NONCE_LEN..];
        self.proof(b"kvferry server", channel, &client_nonce, server_nonce)
            .verify_slice(server_proof)
            .map_err(|_| AuthError::Refused("the peer did not prove the cluster secret".into()))?;
        let proof = self.proof(b"kvferry client", channel, &client_nonce, server_nonce).finalize().into_bytes();
        stream.write_all_by(&proof, deadline)?;
        let mut verdict = [0u8; 1];
        stream.read_exact_by(&mut verdict, deadline)?;
        match verdict[0] {
            VERDICT_OK => Ok(()),
            _ => Err(AuthError::Refused("the peer refused this agent's proof of the cluster secret".into())),
        }
    }

    /// Check the proof of the client at the other end of `stream`, proving ourselves first.
    pub(crate) fn server<S: DeadlineStream>(
        &self,
        stream: &mut S,
        channel: Channel,
        deadline: Deadline,
    ) -> std::result::Result<(), AuthError> {
        let mut answer = [0u8; ANSWER_LEN];
        answer[..4].copy_from_slice(&MAGIC);
        answer[4] = VERSION;
        answer[5] = self.scheme();
        let refuse = |stream: &mut S, verdict: u8, error: AuthError| {
            let mut answer = answer;
            answer[6] = verdict;
            let _ = stream.write_all_by(&answer, deadline);
            Err(error)
        };
        // The head first, so that a client speaking something else is told so at once.
        let mut hello = [0u8; HELLO_LEN];
        stream.read_exact_by(&mut hello[..8], deadline)?;
        if hello[..4] != MAGIC {
            return refuse(stream, VERDICT_VERSION, AuthError::Protocol("not a kvferry handshake".into()));
        }
        stream.read_exact_by(&mut hello[8..], deadline)?;
        if hello[4] != VERSION {
            return refuse(stream, VERDICT_VERSION, AuthError::Protocol(format!("handshake version {}", hello[4])));
        }
        if hello[6] != channel as u8 {
            return refuse(stream, VERDICT_REFUSED, AuthError::Protocol(format!("handshake for channel {}", hello[6])));
        }
        if !self.enabled() {
            return stream.write_all_by(&answer, deadline).map_err(AuthError::from);
        }
        if hello[5] != SCHEME_HMAC {
            return refuse(stream, VERDICT_REQUIRED, AuthError::Refused("the client offered no proof".into()));
        }
        let client_nonce = &hello[8..];
        let server_nonce = nonce()?;
        let proof = self.proof(b"kvferry server", channel, client_nonce, &server_nonce).finalize().into_bytes();
        answer[8..8 + NONCE_LEN].copy_from_slice(&server_nonce);
        answer[8 + NONCE_LEN..].copy_from_slice(&proof);
        stream.write_all_by(&answer, deadline)?;
        let mut client_proof = [0u8; PROOF_LEN];
        stream.read_exact_by(&mut client_proof, deadline)?;
        match self.proof(b"kvferry client", channel, client_nonce, &server_nonce).verify_slice(&client_proof) {
            Ok(()) => stream.write_all_by(&[VERDICT_OK], deadline).map_err(AuthError::from),
            Err(_) => {
                let _ = stream.write_all_by(&[VERDICT_REFUSED], deadline);
                Err(AuthError::Refused("the client did not prove the cluster secret".into()))
            }
        }
    }
}

fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| io::Error::other(format!("the OS random source failed: {e}")))?;
    Ok(nonce)
}

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum AuthError {
    /// A proof was missing or wrong.
    Refused(String),
    /// The other end does not speak the handshake.
    Protocol(String),
    /// The connection failed or the deadline passed.
    Io(io::Error),
}

impl AuthError {
    /// The crate error for a handshake with `peer` that failed.
    pub(crate) fn into_error(self, peer: &str) -> Error {
        let peer = peer.to_string();
        match self {
            AuthError::Refused(cause) => TransferError::Unauthenticated { peer, cause }.into(),
            AuthError::Protocol(detail) => TransferError::Protocol { peer, detail }.into(),
            AuthError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                TransferError::PeerUnreachable { endpoint: peer.clone(), peer, cause: "the handshake timed out".into() }
                    .into()
            }
            AuthError::Io(e) => {
                TransferError::PeerUnreachable { endpoint: peer.clone(), peer, cause: format!("handshake failed: {e}") }
                    .into()
            }
        }
    }
}

impl AuthError {
    /// A failed TLS handshake: a question of trust (a certificate refused, a peer without TLS)
    /// is a refusal, anything else the connection's failure.
    fn from_tls(e: io::Error) -> AuthError {
        match e.kind() {
            io::ErrorKind::PermissionDenied => AuthError::Refused(e.to_string()),
            io::ErrorKind::InvalidData => AuthError::Protocol(e.to_string()),
            _ => AuthError::Io(e),
        }
    }
}

impl From<io::Error> for AuthError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            // TLS refusing trust after its handshake (TLS 1.3 checks a client's certificate once
            // the client has finished, so the client learns of it on its next read).
            io::ErrorKind::PermissionDenied => AuthError::Refused(e.to_string()),
            _ => AuthError::Io(e),
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Refused(why) | AuthError::Protocol(why) => f.write_str(why),
            AuthError::Io(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::thread;
    use std::time::Duration;

    use super::*;

    fn secret(s: &str) -> Auth {
        Auth::resolve(&AuthConfig::Secret(s.as_bytes().to_vec())).unwrap()
    }

    fn run(client: Auth, server: Auth) -> (std::result::Result<(), AuthError>, std::result::Result<(), AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        let server = thread::spawn(move || server.server(&mut b, Channel::Tcp, deadline));
        let client = client.client(&mut a, Channel::Tcp, deadline);
        drop(a);
        (client, server.join().unwrap())
    }

    #[test]
    fn the_same_secret_authenticates_both_ways() {
        let (c, s) = run(secret("a cluster secret of 32 bytes...."), secret("a cluster secret of 32 bytes...."));
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }

    #[test]
    fn a_wrong_secret_is_refused_by_the_client_before_it_proves_anything() {
        let (c, s) = run(secret("one cluster secret, 32 bytes...."), secret("another secret of 32 bytes......"));
        assert!(matches!(c, Err(AuthError::Refused(ref m)) if m.contains("did not prove")), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn a_client_without_a_secret_is_refused_and_a_server_without_one_is_not_trusted() {
        let (c, s) = run(Auth::disabled(), secret("a cluster secret of 32 bytes...."));
        assert!(matches!(c, Err(AuthError::Refused(ref m)) if m.contains("requires")), "{c:?}");
        assert!(matches!(s, Err(AuthError::Refused(_))), "{s:?}");
        let (c, _) = run(secret("a cluster secret of 32 bytes...."), Auth::disabled());
        assert!(matches!(c, Err(AuthError::Refused(ref m)) if m.contains("does not authenticate")), "{c:?}");
        let (c, s) = run(Auth::disabled(), Auth::disabled());
        assert!(c.is_ok() && s.is_ok());
    }

    #[test]
    fn a_replayed_client_proof_is_refused() {
        // A server's fresh nonce makes a proof recorded on one connection worthless on the next.
        let auth = secret("a cluster secret of 32 bytes....");
        let deadline = Deadline::after(Duration::from_secs(5));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = {
            let auth = auth.clone();
            thread::spawn(move || auth.server(&mut b, Channel::Tcp, deadline))
        };
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4] = VERSION;
        hello[5] = SCHEME_HMAC;
        hello[6] = Channel::Tcp as u8;
        a.write_all(&hello).unwrap();
        let mut answer = [0u8; ANSWER_LEN];
        a.read_exact(&mut answer).unwrap();
        // The proof for another server nonce (as recorded from an earlier connection).
        let stale = auth.proof(b"kvferry client", Channel::Tcp, &hello[8..], &[7u8; NONCE_LEN]).finalize().into_bytes();
        a.write_all(&stale).unwrap();
        let mut verdict = [0u8; 1];
        a.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict[0], VERDICT_REFUSED);
        assert!(matches!(server.join().unwrap(), Err(AuthError::Refused(_))));
    }

    #[test]
    fn a_handshake_for_another_channel_is_refused() {
        let auth = secret("a cluster secret of 32 bytes....");
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        let server = {
            let auth = auth.clone();
            thread::spawn(move || auth.server(&mut b, Channel::Exchange, deadline))
        };
        assert!(auth.client(&mut a, Channel::Tcp, deadline).is_err());
        assert!(matches!(server.join().unwrap(), Err(AuthError::Protocol(_))));
    }

    #[test]
    fn a_silent_peer_fails_the_handshake_at_the_deadline() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let started = std::time::Instant::now();
        let r = secret("a cluster secret of 32 bytes....").client(
            &mut a,
            Channel::Tcp,
            Deadline::after(Duration::from_millis(200)),
        );
        assert!(matches!(r, Err(AuthError::Io(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn sealed_values_open_only_with_the_secret_and_their_label() {
        let ours = secret("a cluster secret of 32 bytes....");
        let sealed = ours.seal(b"kvferry/agents/a", b"metadata with keys");
        assert!(!sealed.windows(8).any(|w| w == b"metadata"), "the value is encrypted");
        assert_eq!(ours.open(b"kvferry/agents/a", &sealed).unwrap(), b"metadata with keys");
        assert!(ours.open(b"kvferry/agents/b", &sealed).is_err(), "moved under another name");
        assert!(secret("another secret of 32 bytes......").open(b"kvferry/agents/a", &sealed).is_err());
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(ours.open(b"kvferry/agents/a", &altered).is_err());
        assert!(ours.open(b"kvferry/agents/a", b"KVFMplain metadata").is_err());
        assert!(ours.open(b"kvferry/agents/a", b"KVFE").is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        let e = Auth::resolve(&AuthConfig::Secret(b"short".to_vec())).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::InvalidArgument);
    }
}
