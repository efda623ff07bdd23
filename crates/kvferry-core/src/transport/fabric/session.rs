//! Authenticated messages between rails. RDM endpoints have no connections to run the cluster-secret
//! handshake on, so each pair of rails establishes a session over the message channel itself, and
//! every later message carries a counter and a tag under the session's key:
//!
//! ```text
//! A → B  hello      4 | len u16 | addr A | nonce A [32]
//! B → A  challenge  5 | len u16 | addr B | nonce A [32] | nonce B [32] | proof B [32]
//! A → B  proof      6 | len u16 | addr A | nonce B [32] | proof A [32]
//! B → A  welcome    sealed, kind 7, empty payload
//! sealed            kind u8 | initiator u8 | counter u64 | len u16 | sender addr | payload | tag [16]
//!
//! proof B = derive("kvferry fabric responder", nonce A, nonce B, addr A, addr B)
//! proof A = derive("kvferry fabric initiator", nonce A, nonce B, addr A, addr B)
//! key     = derive("kvferry fabric session",   nonce A, nonce B, addr A, addr B)
//! tag     = HMAC-SHA256(key, every byte before the tag), first 16 bytes
//! ```
//!
//! `derive` is [`Auth::derive`] under the cluster key. Fresh nonces on both sides make a recorded
//! handshake worthless later; the counter (strictly increasing per sender and session) makes a
//! recorded sealed message worthless once its successor, or itself, has arrived. `initiator` is 1
//! when the sender began the session, so two sessions begun at once by both sides stay apart.
//! Until a proof verifies, a stranger's hello costs one half-open entry, at most [`MAX_HALF_OPEN`]
//! (the oldest is evicted); every other state belongs to a peer that proved the secret.

use std::collections::{HashMap, VecDeque};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::auth::Auth;

pub(super) const MSG_HELLO: u8 = 4;
pub(super) const MSG_CHALLENGE: u8 = 5;
pub(super) const MSG_PROOF: u8 = 6;
pub(super) const MSG_WELCOME: u8 = 7;
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
pub(super) const TAG_LEN: usize = 16;
/// Handshakes begun by others and not yet proven, at most.
pub(super) const MAX_HALF_OPEN: usize = 256;

type Nonce = [u8; NONCE_LEN];

/// A session's state on one side.
struct Session {
    key: [u8; 32],
    /// The counter of the last message sent.
    sent: u64,
    /// The highest counter received: anything not above it is a replay.
    received: u64,
}

/// A hello this side answered, waiting for the proof.
struct HalfOpen {
    peer: Vec<u8>,
    nonce_a: Nonce,
    nonce_b: Nonce,
}

/// A hello this side sent; `key` once the peer's challenge verified, until its welcome.
struct Initiating {
    nonce: Nonce,
    key: Option<[u8; 32]>,
}

/// What an incoming message means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A message that verified: act on it.
    Message { kind: u8, from: Vec<u8>, payload: Vec<u8> },
    /// Send `message` (a handshake step) to `to`.
    Reply { to: Vec<u8>, message: Vec<u8> },
    /// `peer` proved the secret and a session with it is open; send `welcome` to it, then what
    /// waits for it.
    Accepted { peer: Vec<u8>, welcome: Vec<u8> },
    /// The session this side began with `peer` is open: send what waits for it.
    Established { peer: Vec<u8> },
    /// `peer` answered our hello without proving the secret.
    Refused { peer: Vec<u8>, cause: String },
    /// Ignored, and why (for logs).
    Dropped(&'static str),
}

/// The sessions of one rail, by peer rail address.
pub(crate) struct Sessions {
    auth: Auth,
    local: Vec<u8>,
    half_open: VecDeque<HalfOpen>,
    initiating: HashMap<Vec<u8>, Initiating>,
    /// By (peer address, whether this side began the session).
    open: HashMap<(Vec<u8>, bool), Session>,
}

fn nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("the OS random source failed");
    n
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn tag(key: &[u8; 32], bytes: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(bytes);
    let full: [u8; 32] = mac.finalize().into_bytes().into();
    full[..TAG_LEN].try_into().expect("a tag is shorter than the MAC")
}

fn put_address(out: &mut Vec<u8>, address: &[u8]) {
    out.extend_from_slice(&(address.len() as u16).to_le_bytes());
    out.extend_from_slice(address);
}

/// Fields off the front of a message; `None` when it is too short.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn address(&mut self) -> Option<&'a [u8]> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        self.take(len)
    }

    fn nonce(&mut self) -> Option<Nonce> {
        self.take(NONCE_LEN)?.try_into().ok()
    }
}

impl Sessions {
    pub fn new(auth: Auth, local: Vec<u8>) -> Sessions {
        Sessions { auth, local, half_open: VecDeque::new(), initiating: HashMap::new(), open: HashMap::new() }
    }

    /// Whether messages are authenticated at all.
    pub fn enabled(&self) -> bool {
        self.auth.enabled()
    }

    /// Whether a hello to `peer` is already out.
    pub fn initiating(&self, peer: &[u8]) -> bool {
        self.initiating.contains_key(peer)
    }

    /// Whether any state refers to `peer` (its address is then still needed).
    pub fn holds(&self, peer: &[u8]) -> bool {
        self.initiating.contains_key(peer)
            || self.open.contains_key(&(peer.to_vec(), true))
            || self.open.contains_key(&(peer.to_vec(), false))
            || self.half_open.iter().any(|h| h.peer == peer)
    }

    /// A hello to `peer`, beginning a session (a hello still unanswered is superseded).
    pub fn hello(&mut self, peer: &[u8]) -> Vec<u8> {
        let n = nonce();
        self.initiating.insert(peer.to_vec(), Initiating { nonce: n, key: None });
        let mut out = vec![MSG_HELLO];
        put_address(&mut out, &self.local);
        out.extend_from_slice(&n);
        out
    }

    /// Give up the hello to `peer`, and with `sessions`, the sessions with it too (the next message
    /// begins a new one).
    pub fn forget(&mut self, peer: &[u8], sessions: bool) {
        self.initiating.remove(peer);
        if sessions {
            self.open.remove(&(peer.to_vec(), true));
            self.open.remove(&(peer.to_vec(), false));
        }
    }

    /// `kind | payload` sealed for `peer`, or `None` when no session with it is open.
    pub fn seal(&mut self, peer: &[u8], kind: u8, payload: &[u8]) -> Option<Vec<u8>> {
        // The session this side began where there is one; the other side's otherwise.
        let began = self.open.contains_key(&(peer.to_vec(), true));
        self.seal_in(peer, began, kind, payload)
    }

    fn seal_in(&mut self, peer: &[u8], began: bool, kind: u8, payload: &[u8]) -> Option<Vec<u8>> {
        let session = self.open.get_mut(&(peer.to_vec(), began))?;
        session.sent += 1;
        let mut out = Vec::with_capacity(12 + self.local.len() + payload.len() + TAG_LEN);
        out.push(kind);
        out.push(began as u8);
        out.extend_from_slice(&session.sent.to_le_bytes());
        put_address(&mut out, &self.local);
        out.extend_from_slice(payload);
        let t = tag(&session.key, &out);
        out.extend_from_slice(&t);
        Some(out)
    }

    fn derive(&self, label: &[u8], a: &Nonce, b: &Nonce, addr_a: &[u8], addr_b: &[u8]) -> [u8; 32] {
        self.auth.derive(label, &[a, b, addr_a, addr_b]).expect("sessions are only used with a key")
    }

    /// What `message` means; nothing in it is trusted until this says so.
    pub fn open(&mut self, message: &[u8]) -> Incoming {
        let Some((&kind, body)) = message.split_first() else { return Incoming::Dropped("an empty message") };
        let answer = match kind {
            MSG_HELLO => self.on_hello(body),
            MSG_CHALLENGE => self.on_challenge(body),
            MSG_PROOF => self.on_proof(body),
            _ => self.on_sealed(message),
        };
        answer.unwrap_or(Incoming::Dropped("a malformed message"))
    }

    fn on_hello(&mut self, body: &[u8]) -> Option<Incoming> {
        let mut f = Fields(body);
        let peer = f.address()?.to_vec();
        let nonce_a = f.nonce()?;
        if !f.0.is_empty() {
            return None;
        }
        let nonce_b = nonce();
        let proof = self.derive(b"kvferry fabric responder", &nonce_a, &nonce_b, &peer, &self.local);
        if self.half_open.len() >= MAX_HALF_OPEN {
            self.half_open.pop_front();
        }
        self.half_open.push_back(HalfOpen { peer: peer.clone(), nonce_a, nonce_b });
        let mut out = vec![MSG_CHALLENGE];
        put_address(&mut out, &self.local);
        out.extend_from_slice(&nonce_a);
        out.extend_from_slice(&nonce_b);
        out.extend_from_slice(&proof);
        Some(Incoming::Reply { to: peer, message: out })
    }

    fn on_challenge(&mut self, body: &[u8]) -> Option<Incoming> {
        let mut f = Fields(body);
        let peer = f.address()?.to_vec();
        let (nonce_a, nonce_b) = (f.nonce()?, f.nonce()?);
        let proof = f.take(PROOF_LEN)?;
        if !f.0.is_empty() {
            return None;
        }
        // Only an answer to the hello outstanding counts: a stranger does not know its nonce.
        let Some(ours) = self.initiating.get(&peer).filter(|i| i.key.is_none() && same(&i.nonce, &nonce_a)) else {
            return Some(Incoming::Dropped("a challenge to no hello of ours"));
        };
        let nonce_a = ours.nonce;
        let expected = self.derive(b"kvferry fabric responder", &nonce_a, &nonce_b, &self.local, &peer);
        if !same(&expected, proof) {
            self.initiating.remove(&peer);
            return Some(Incoming::Refused { peer, cause: "the peer did not prove the cluster secret".into() });
        }
        let key = self.derive(b"kvferry fabric session", &nonce_a, &nonce_b, &self.local, &peer);
        let ours_proof = self.derive(b"kvferry fabric initiator", &nonce_a, &nonce_b, &self.local, &peer);
        self.initiating.get_mut(&peer).expect("found above").key = Some(key);
        let mut out = vec![MSG_PROOF];
        put_address(&mut out, &self.local);
        out.extend_from_slice(&nonce_b);
        out.extend_from_slice(&ours_proof);
        Some(Incoming::Reply { to: peer, message: out })
    }

    fn on_proof(&mut self, body: &[u8]) -> Option<Incoming> {
        let mut f = Fields(body);
        let peer = f.address()?.to_vec();
        let nonce_b = f.nonce()?;
        let proof = f.take(PROOF_LEN)?;
        if !f.0.is_empty() {
            return None;
        }
        let Some(at) = self.half_open.iter().position(|h| h.peer == peer && same(&h.nonce_b, &nonce_b)) else {
            return Some(Incoming::Dropped("a proof for no challenge of ours"));
        };
        let h = self.half_open.remove(at).expect("found above");
        let expected = self.derive(b"kvferry fabric initiator", &h.nonce_a, &h.nonce_b, &peer, &self.local);
        if !same(&expected, proof) {
            return Some(Incoming::Dropped("a proof that did not verify"));
        }
        let key = self.derive(b"kvferry fabric session", &h.nonce_a, &h.nonce_b, &peer, &self.local);
        self.open.insert((peer.clone(), false), Session { key, sent: 0, received: 0 });
        let welcome = self.seal_in(&peer, false, MSG_WELCOME, &[]).expect("inserted above");
        Some(Incoming::Accepted { peer, welcome })
    }

    fn on_sealed(&mut self, message: &[u8]) -> Option<Incoming> {
        let (signed, got) = message.split_at_checked(message.len().checked_sub(TAG_LEN)?)?;
        let mut f = Fields(signed);
        let (kind, flag) = (f.take(1)?[0], f.take(1)?[0]);
        let counter = u64::from_le_bytes(f.take(8)?.try_into().ok()?);
        let peer = f.address()?.to_vec();
        let payload = f.0;
        // The sender's `initiator` is 1 when it began the session, so this side did not.
        let began = match flag {
            0 => true,
            1 => false,
            _ => return None,
        };
        if let Some(session) = self.open.get_mut(&(peer.clone(), began)) {
            if !same(&tag(&session.key, signed), got) {
                return Some(Incoming::Dropped("a message whose tag did not verify"));
            }
            if counter <= session.received {
                return Some(Incoming::Dropped("a replayed message"));
            }
            session.received = counter;
            if kind == MSG_WELCOME {
                return Some(Incoming::Dropped("a second welcome"));
            }
            return Some(Incoming::Message { kind, from: peer, payload: payload.to_vec() });
        }
        // The welcome opens a session this side began.
        let key = match (kind, began, self.initiating.get(&peer)) {
            (MSG_WELCOME, true, Some(Initiating { key: Some(key), .. })) => *key,
            _ => return Some(Incoming::Dropped("a message from an address with no session")),
        };
        if !same(&tag(&key, signed), got) {
            return Some(Incoming::Dropped("a welcome whose tag did not verify"));
        }
        self.initiating.remove(&peer);
        self.open.insert((peer.clone(), true), Session { key, sent: 0, received: counter });
        Some(Incoming::Established { peer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthConfig;

    fn auth(secret: &str) -> Auth {
        Auth::resolve(&AuthConfig::Secret(secret.as_bytes().to_vec())).unwrap()
    }

    const SECRET: &str = "a cluster secret of 32 bytes....";

    /// Runs the handshake from `a` to `b`; returns what `a` last made of it.
    fn handshake(a: &mut Sessions, b: &mut Sessions) -> Incoming {
        let hello = a.hello(&b.local.clone());
        let Incoming::Reply { to, message: challenge } = b.open(&hello) else { panic!("b answers a hello") };
        assert_eq!(to, a.local);
        let proof = match a.open(&challenge) {
            Incoming::Reply { message, .. } => message,
            other => return other,
        };
        let Incoming::Accepted { peer, welcome } = b.open(&proof) else { panic!("b accepts the proof") };
        assert_eq!(peer, a.local);
        a.open(&welcome)
    }

    fn pair(sa: &str, sb: &str) -> (Sessions, Sessions) {
        (Sessions::new(auth(sa), b"rail-a".to_vec()), Sessions::new(auth(sb), b"rail-b".to_vec()))
    }

    fn message(kind: u8, from: &[u8], payload: &[u8]) -> Incoming {
        Incoming::Message { kind, from: from.to_vec(), payload: payload.to_vec() }
    }

    #[test]
    fn a_session_carries_messages_both_ways_once_each() {
        let (mut a, mut b) = pair(SECRET, SECRET);
        assert_eq!(handshake(&mut a, &mut b), Incoming::Established { peer: b"rail-b".to_vec() });
        let m1 = a.seal(b"rail-b", 1, b"first").unwrap();
        let m2 = a.seal(b"rail-b", 1, b"second").unwrap();
        assert_eq!(b.open(&m1), message(1, b"rail-a", b"first"));
        assert_eq!(b.open(&m2), message(1, b"rail-a", b"second"));
        assert_eq!(b.open(&m1), Incoming::Dropped("a replayed message"));
        assert_eq!(b.open(&m2), Incoming::Dropped("a replayed message"));
        let back = b.seal(b"rail-a", 3, b"verdicts").unwrap();
        assert_eq!(a.open(&back), message(3, b"rail-b", b"verdicts"));
        // A message reflected back to its sender names the sender itself: no session.
        assert!(matches!(a.open(&m1), Incoming::Dropped(_)));
    }

    #[test]
    fn altered_and_unsessioned_messages_are_dropped() {
        let (mut a, mut b) = pair(SECRET, SECRET);
        handshake(&mut a, &mut b);
        let genuine = a.seal(b"rail-b", 1, b"payload").unwrap();
        for at in 0..genuine.len() {
            let mut altered = genuine.clone();
            altered[at] ^= 0x01;
            assert!(matches!(b.open(&altered), Incoming::Dropped(_)), "byte {at} altered");
        }
        assert!(matches!(b.open(&genuine[..genuine.len() - 1]), Incoming::Dropped(_)));
        // A plain notification, as an agent without authentication sends it.
        let mut plain = vec![1u8];
        plain.extend_from_slice(&4u16.to_le_bytes());
        plain.extend_from_slice(b"evil");
        plain.extend_from_slice(b"data");
        assert!(matches!(b.open(&plain), Incoming::Dropped(_)));
        // Sealed under a session of another cluster, claiming rail-a's address.
        let (mut x, mut y) = (Sessions::new(auth("another secret of 32 bytes......"), b"rail-a".to_vec()), {
            Sessions::new(auth("another secret of 32 bytes......"), b"rail-b".to_vec())
        });
        handshake(&mut x, &mut y);
        let foreign = x.seal(b"rail-b", 1, b"payload").unwrap();
        assert!(matches!(b.open(&foreign), Incoming::Dropped(_)));
        assert_eq!(b.open(&genuine), message(1, b"rail-a", b"payload"));
    }

    #[test]
    fn another_secret_is_refused_and_opens_nothing() {
        let (mut a, mut b) = pair(SECRET, "another secret of 32 bytes......");
        let hello = a.hello(b"rail-b");
        let Incoming::Reply { message: challenge, .. } = b.open(&hello) else { panic!() };
        assert!(matches!(a.open(&challenge), Incoming::Refused { .. }));
        assert!(a.seal(b"rail-b", 1, b"x").is_none());
        // The responder's side: a proof under another key opens nothing.
        let (mut a, mut b) = pair(SECRET, "another secret of 32 bytes......");
        let hello = a.hello(b"rail-b");
        let Incoming::Reply { message: challenge, .. } = b.open(&hello) else { panic!() };
        let mut f = Fields(&challenge[1..]);
        f.address().unwrap();
        let (na, nb) = (f.nonce().unwrap(), f.nonce().unwrap());
        let forged = a.derive(b"kvferry fabric initiator", &na, &nb, b"rail-a", b"rail-b");
        let mut proof = vec![MSG_PROOF];
        put_address(&mut proof, b"rail-a");
        proof.extend_from_slice(&nb);
        proof.extend_from_slice(&forged);
        assert_eq!(b.open(&proof), Incoming::Dropped("a proof that did not verify"));
        assert!(b.seal(b"rail-a", 3, b"x").is_none());
    }

    #[test]
    fn a_replayed_handshake_opens_nothing() {
        let (mut a, mut b) = pair(SECRET, SECRET);
        let hello = a.hello(b"rail-b");
        let Incoming::Reply { message: challenge, .. } = b.open(&hello) else { panic!() };
        let Incoming::Reply { message: proof, .. } = a.open(&challenge) else { panic!() };
        let Incoming::Accepted { welcome, .. } = b.open(&proof) else { panic!() };
        assert!(matches!(a.open(&welcome), Incoming::Established { .. }));
        // Each step again, as recorded: none opens a session or yields a message.
        assert!(matches!(a.open(&challenge), Incoming::Dropped(_)));
        assert_eq!(b.open(&proof), Incoming::Dropped("a proof for no challenge of ours"));
        assert!(matches!(a.open(&welcome), Incoming::Dropped(_)));
        // A replayed hello gets a fresh challenge, which the initiator ignores.
        let Incoming::Reply { message: again, .. } = b.open(&hello) else { panic!() };
        assert_ne!(again, challenge);
        assert!(matches!(a.open(&again), Incoming::Dropped(_)));
    }

    #[test]
    fn strangers_hold_at_most_the_half_open_limit() {
        let (mut a, mut b) = pair(SECRET, SECRET);
        let hello = a.hello(b"rail-b");
        let Incoming::Reply { message: challenge, .. } = b.open(&hello) else { panic!() };
        for i in 0..MAX_HALF_OPEN as u32 + 10 {
            let mut stranger = vec![MSG_HELLO];
            put_address(&mut stranger, &i.to_le_bytes());
            stranger.extend_from_slice(&[0u8; NONCE_LEN]);
            assert!(matches!(b.open(&stranger), Incoming::Reply { .. }));
        }
        assert_eq!(b.half_open.len(), MAX_HALF_OPEN);
        // The genuine one was the oldest: evicted, so its proof opens nothing.
        let Incoming::Reply { message: proof, .. } = a.open(&challenge) else { panic!() };
        assert!(matches!(b.open(&proof), Incoming::Dropped(_)));
    }

    #[test]
    fn sessions_begun_by_both_sides_at_once_both_work() {
        let (mut a, mut b) = pair(SECRET, SECRET);
        let (ha, hb) = (a.hello(b"rail-b"), b.hello(b"rail-a"));
        let (Incoming::Reply { message: ca, .. }, Incoming::Reply { message: cb, .. }) = (b.open(&ha), a.open(&hb))
        else {
            panic!()
        };
        let (Incoming::Reply { message: pa, .. }, Incoming::Reply { message: pb, .. }) = (a.open(&ca), b.open(&cb))
        else {
            panic!()
        };
        let (Incoming::Accepted { welcome: wb, .. }, Incoming::Accepted { welcome: wa, .. }) =
            (b.open(&pa), a.open(&pb))
        else {
            panic!()
        };
        // Before its own welcome, a side already talks over the other's session (whose welcome
        // went first).
        assert!(matches!(b.open(&wa), Incoming::Established { .. }));
        let early = a.seal(b"rail-b", 1, b"early").unwrap();
        assert_eq!(b.open(&early), message(1, b"rail-a", b"early"));
        assert!(matches!(a.open(&wb), Incoming::Established { .. }));
        let (m, n) = (a.seal(b"rail-b", 1, b"late").unwrap(), b.seal(b"rail-a", 3, b"back").unwrap());
        assert_eq!(b.open(&m), message(1, b"rail-a", b"late"));
        assert_eq!(a.open(&n), message(3, b"rail-b", b"back"));
    }
}
