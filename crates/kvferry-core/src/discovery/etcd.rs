//! A small blocking client for etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`):
//! HTTP/1.1 over a `TcpStream`, base64 keys and values, no async runtime and no code generation.
//! Plain `http://` only: deployments that need TLS to etcd put a local proxy in front.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::DiscoveryError;
use crate::deadline::Deadline;

/// Responses larger than this are refused: a prefix of agent metadata is kilobytes per agent.
const MAX_RESPONSE: usize = 256 << 20;

/// Keys with their values.
pub(crate) type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatchEvent {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

#[derive(Debug, Clone)]
pub(crate) struct EtcdClient {
    /// `host:port` of each endpoint, tried in order.
    endpoints: Vec<String>,
    timeout: Duration,
}

impl EtcdClient {
    /// `endpoints` as `http://host:port` or `host:port`.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<EtcdClient, DiscoveryError> {
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let bare = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
                if bare.contains("://") || bare.is_empty() || bare.contains('/') {
                    return Err(DiscoveryError::Config {
                        why: format!("etcd endpoint {e:?} is not http://host:port (TLS needs a local proxy)"),
                    });
                }
                Ok(bare.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(DiscoveryError::Config { why: "no etcd endpoint given".into() });
        }
        Ok(EtcdClient { endpoints, timeout })
    }

    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// A lease that expires `ttl` after its last keep-alive; returns its id.
    pub fn grant(&self, ttl: Duration) -> Result<i64, DiscoveryError> {
        let reply = self.call("/v3/lease/grant", &json!({ "TTL": ttl.as_secs().max(1) }))?;
        int(&reply["ID"]).filter(|&id| id != 0).ok_or_else(|| self.bad("lease grant without an ID", &reply))
    }

    /// Renew a lease; `Err(LeaseLost)` once etcd no longer knows it (it expired).
    pub fn keep_alive(&self, lease: i64) -> Result<(), DiscoveryError> {
        let reply = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        // A stream of one message: {"result": {..., "TTL": "2"}}; an expired lease has no TTL.
        match int(&reply["result"]["TTL"]) {
            Some(ttl) if ttl > 0 => Ok(()),
            _ => Err(DiscoveryError::LeaseLost { lease }),
        }
    }

    pub fn revoke(&self, lease: i64) -> Result<(), DiscoveryError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).map(drop)
    }

    pub fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<(), DiscoveryError> {
        let body = json!({ "key": BASE64.encode(key), "value": BASE64.encode(value), "lease": lease.to_string() });
        self.call("/v3/kv/put", &body).map(drop)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DiscoveryError> {
        let reply = self.call("/v3/kv/range", &json!({ "key": BASE64.encode(key) }))?;
        Ok(self.kvs(&reply)?.into_iter().next().map(|(_, v)| v))
    }

    /// Every key under `prefix` with its value, and the revision the answer reflects.
    pub fn list(&self, prefix: &[u8]) -> Result<(KeyValues, i64), DiscoveryError> {
        let body = json!({ "key": BASE64.encode(prefix), "range_end": BASE64.encode(range_end(prefix)) });
        let reply = self.call("/v3/kv/range", &body)?;
        let revision = int(&reply["header"]["revision"]).ok_or_else(|| self.bad("range without a revision", &reply))?;
        Ok((self.kvs(&reply)?, revision))
    }

    fn kvs(&self, reply: &Value) -> Result<KeyValues, DiscoveryError> {
        let Some(kvs) = reply.get("kvs") else { return Ok(Vec::new()) };
        let kvs = kvs.as_array().ok_or_else(|| self.bad("kvs is not a list", reply))?;
        kvs.iter().map(|kv| Ok((self.bytes(&kv["key"], reply)?, self.bytes(&kv["value"], reply)?))).collect()
    }

    fn bytes(&self, field: &Value, reply: &Value) -> Result<Vec<u8>, DiscoveryError> {
        match field {
            // etcd leaves empty values out.
            Value::Null => Ok(Vec::new()),
            Value::String(s) => BASE64.decode(s).map_err(|_| self.bad("a key or value is not base64", reply)),
            _ => Err(self.bad("a key or value is not a string", reply)),
        }
    }

    /// Watch every key under `prefix` from revision `from`; [`Watch::next`] waits at most `poll`.
    pub fn watch(&self, prefix: &[u8], from: i64, poll: Duration) -> Result<Watch, DiscoveryError> {
        let body = json!({ "create_request": {
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(range_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let (stream, endpoint) = self.connect(Deadline::after(self.timeout))?;
        let mut watch = Watch { stream, endpoint, raw: Vec::new(), body: Vec::new(), ended: false };
        let request = request_bytes(&watch.endpoint, "/v3/watch", &body, false);
        watch.stream.write_all(&request).map_err(|e| self.unreachable(&watch.endpoint, e))?;
        watch.read_head(self)?;
        watch.stream.set_read_timeout(Some(poll)).map_err(|e| self.unreachable(&watch.endpoint, e))?;
        Ok(watch)
    }

    fn connect(&self, deadline: Deadline) -> Result<(TcpStream, String), DiscoveryError> {
        let mut last = String::from("no endpoint");
        for endpoint in &self.endpoints {
            match crate::net::connect_within(endpoint, deadline) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    stream
                        .set_read_timeout(Some(self.timeout))
                        .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
                        .map_err(|e| self.unreachable(endpoint, e))?;
                    return Ok((stream, endpoint.clone()));
                }
                Err(cause) => last = cause,
            }
        }
        Err(DiscoveryError::Unreachable { endpoints: self.endpoints(), cause: last })
    }

    /// One unary call: POST the JSON body, read the whole answer.
    fn call(&self, path: &str, body: &Value) -> Result<Value, DiscoveryError> {
        let (mut stream, endpoint) = self.connect(Deadline::after(self.timeout))?;
        stream.write_all(&request_bytes(&endpoint, path, body, true)).map_err(|e| self.unreachable(&endpoint, e))?;
        let mut raw = Vec::new();
        stream.take(MAX_RESPONSE as u64 + 1).read_to_end(&mut raw).map_err(|e| self.unreachable(&endpoint, e))?;
        if raw.len() > MAX_RESPONSE {
            return Err(DiscoveryError::BadResponse {
                endpoint,
                why: format!("{path}: answer over {MAX_RESPONSE} bytes"),
            });
        }
        let bad =
            |why: String| DiscoveryError::BadResponse { endpoint: endpoint.clone(), why: format!("{path}: {why}") };
        let head_end = find(&raw, b"\r\n\r\n").ok_or_else(|| bad("no complete HTTP head".into()))?;
        let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
        let status = head.split(' ').nth(1).unwrap_or("");
        let mut body = raw[head_end + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            let mut decoded = Vec::new();
            dechunk(&mut body, &mut decoded).map_err(bad)?;
            body = decoded;
        }
        let reply: Value = serde_json::from_slice(&body).map_err(|e| {
            bad(format!("HTTP {status}, not JSON ({e}): {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
        })?;
        if let Some(message) = reply.get("error").or_else(|| reply.get("message")) {
            return Err(bad(format!("etcd says {message}")));
        }
        if status != "200" {
            return Err(bad(format!("HTTP {status}")));
        }
        Ok(reply)
    }

    fn unreachable(&self, endpoint: &str, e: io::Error) -> DiscoveryError {
        DiscoveryError::Unreachable { endpoints: endpoint.to_string(), cause: e.to_string() }
    }

    fn bad(&self, why: &str, reply: &Value) -> DiscoveryError {
        let mut text = reply.to_string();
        text.truncate(200);
        DiscoveryError::BadResponse { endpoint: self.endpoints(), why: format!("{why}: {text}") }
    }
}

/// An open watch: [`Watch::next`] yields its events as etcd streams them.
pub(crate) struct Watch {
    stream: TcpStream,
    endpoint: String,
    /// Bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked bytes not yet parsed as JSON messages.
    body: Vec<u8>,
    ended: bool,
}

impl Watch {
    fn read_head(&mut self, client: &EtcdClient) -> Result<(), DiscoveryError> {
        let head_end = loop {
            if let Some(end) = find(&self.raw, b"\r\n\r\n") {
                break end;
            }
            if self.fill().map_err(|e| client.unreachable(&self.endpoint, e))? == 0 {
                return Err(self.bad("the watch closed before answering".into()));
            }
        };
        let head = String::from_utf8_lossy(&self.raw[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") || !head.contains("transfer-encoding: chunked") {
            return Err(self.bad(format!("unexpected watch answer: {}", head.lines().next().unwrap_or(""))));
        }
        self.raw.drain(..head_end + 4);
        Ok(())
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.raw.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The events of the next message, waiting at most the stream's read timeout: `Ok(None)` when
    /// nothing arrived meanwhile (the caller checks whether to stop, then calls again).
    pub fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, DiscoveryError> {
        loop {
            if let Some(message) = self.parse_one()? {
                return Ok(Some(self.events(&message)?));
            }
            if self.ended {
                return Err(self.bad("etcd ended the watch".into()));
            }
            match self.fill() {
                Ok(0) => return Err(self.bad("etcd closed the watch".into())),
                Ok(_) => {
                    let ended = dechunk(&mut self.raw, &mut self.body).map_err(|why| self.bad(why))?;
                    self.ended |= ended;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) => {
                    return Err(DiscoveryError::Unreachable { endpoints: self.endpoint.clone(), cause: e.to_string() });
                }
            }
        }
    }

    fn parse_one(&mut self) -> Result<Option<Value>, DiscoveryError> {
        let mut values = serde_json::Deserializer::from_slice(&self.body).into_iter::<Value>();
        match values.next() {
            Some(Ok(v)) => {
                let used = values.byte_offset();
                self.body.drain(..used);
                Ok(Some(v))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(self.bad(format!("a watch message is not JSON: {e}"))),
            None => Ok(None),
        }
    }

    fn events(&self, message: &Value) -> Result<Vec<WatchEvent>, DiscoveryError> {
        let result = &message["result"];
        if result.is_null() || result["canceled"] == Value::Bool(true) {
            return Err(self.bad(format!("the watch was cancelled: {message}")));
        }
        let Some(events) = result.get("events") else { return Ok(Vec::new()) };
        let decode = |v: &Value| match v {
            Value::Null => Ok(Vec::new()),
            Value::String(s) => BASE64.decode(s).map_err(|_| self.bad("a watched key is not base64".into())),
            _ => Err(self.bad("a watched key is not a string".into())),
        };
        events
            .as_array()
            .ok_or_else(|| self.bad("events is not a list".into()))?
            .iter()
            .map(|e| {
                let key = decode(&e["kv"]["key"])?;
                // The gateway leaves the default enum value (PUT) out.
                Ok(match e["type"].as_str() {
                    Some("DELETE") => WatchEvent::Delete { key },
                    _ => WatchEvent::Put { key, value: decode(&e["kv"]["value"])? },
                })
            })
            .collect()
    }

    fn bad(&self, why: String) -> DiscoveryError {
        DiscoveryError::BadResponse { endpoint: self.endpoint.clone(), why }
    }
}

fn request_bytes(endpoint: &str, path: &str, body: &Value, close: bool) -> Vec<u8> {
    let body = body.to_string();
    let connection = if close { "close" } else { "keep-alive" };
    format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The end of the range holding every key that starts with `prefix`: its last byte that is not
/// 0xff, plus one (etcd's convention; `\0` means "to the end of the key space").
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's int64 fields arrive as JSON strings.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Move the complete chunks of a `Transfer-Encoding: chunked` body from `raw` to `out`; returns
/// whether the last (empty) chunk was seen. A partial chunk stays in `raw` for the next read.
fn dechunk(raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<bool, String> {
    let mut at = 0;
    let ended = loop {
        let Some(line_end) = find(&raw[at..], b"\r\n").map(|i| at + i) else { break false };
        let size_text = String::from_utf8_lossy(&raw[at..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        if size > MAX_RESPONSE {
            return Err(format!("a chunk of {size} bytes"));
        }
        if size == 0 {
            // The last chunk: its size line, optional trailers, then an empty line.
            match find(&raw[at..], b"\r\n\r\n") {
                Some(end) => {
                    at += end + 4;
                    break true;
                }
                None => break false,
            }
        }
        let data = line_end + 2;
        if raw.len() < data + size + 2 {
            break false;
        }
        out.extend_from_slice(&raw[data..data + size]);
        at = data + size + 2;
    };
    raw.drain(..at);
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_decoded_across_reads() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut out = Vec::new();
        let mut raw = Vec::new();
        // Feed it one byte at a time: partial sizes, chunks and endings wait for more.
        for (i, &b) in body.iter().enumerate() {
            raw.push(b);
            let ended = dechunk(&mut raw, &mut out).unwrap();
            assert_eq!(ended, i == body.len() - 1, "ended after byte {i}");
        }
        assert!(raw.is_empty());
        assert_eq!(out, b"hello world");
        assert!(dechunk(&mut b"zz\r\n".to_vec(), &mut out).is_err());
    }

    #[test]
    fn prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(range_end(b"kvferry/"), b"kvferry0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn endpoints_must_be_plain_http() {
        let ok = EtcdClient::new(&["http://127.0.0.1:2379/".into(), "etcd:2379".into()], Duration::from_secs(1));
        assert_eq!(ok.unwrap().endpoints(), "127.0.0.1:2379,etcd:2379");
        for bad in ["https://etcd:2379", "", "http://etcd:2379/v3"] {
            let e = EtcdClient::new(&[bad.into()], Duration::from_secs(1)).unwrap_err();
            assert!(matches!(e, DiscoveryError::Config { .. }), "{bad}: {e}");
        }
    }
}
