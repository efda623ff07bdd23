//! The TCP transport's hello; everything after it is the shared [frame format](crate::transport::frame).
//!
//! ```text
//! hello      (initiator → target)  magic "KVFT" | version u16 | name_len u16 | name
//! hello ack  (target → initiator)  magic "KVFT" | version u16 | status u8 | 0u8
//! ```

pub const MAGIC: [u8; 4] = *b"KVFT";
pub const VERSION: u16 = 1;
pub const HELLO_ACK_LEN: usize = 8;
pub const HELLO_OK: u8 = 0;
pub const HELLO_BAD_VERSION: u8 = 1;

pub fn encode_hello(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + name.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

pub fn encode_hello_ack(status: u8) -> [u8; HELLO_ACK_LEN] {
    let mut b = [0u8; HELLO_ACK_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6] = status;
    b
}
