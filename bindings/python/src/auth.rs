//! The cluster secret: how agents are given it, and the handshake for the vLLM connector's own
//! engine side channel, so that exchange is authenticated by the same code as every other.

use std::mem::ManuallyDrop;
use std::net::TcpStream;
use std::os::fd::FromRawFd;

use kvferry_core::AuthConfig;
use kvferry_core::auth::{Auth, Channel, Role};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::deadline;
use crate::errors::OrRaise;

/// `secret` (text or bytes) wins; otherwise `auth` is `"env"` (the environment, or a random
/// secret of this process) or `"none"`.
pub(crate) fn auth_config(secret: Option<&Bound<'_, PyAny>>, auth: &str) -> PyResult<AuthConfig> {
    let secret = secret
        .map(|s| match s.extract::<String>() {
            Ok(text) => Ok(text.into_bytes()),
            Err(_) => s.extract::<Vec<u8>>(),
        })
        .transpose()?;
    match (auth, secret) {
        (_, Some(secret)) => Ok(AuthConfig::Secret(secret)),
        ("env", None) => Ok(AuthConfig::FromEnv),
        ("none", None) => Ok(AuthConfig::Disabled),
        (other, None) => Err(PyValueError::new_err(format!("auth must be \"env\" or \"none\", got {other:?}"))),
    }
}

/// Prove the cluster secret over the connected TCP socket `fd` (blocking mode) and check the
/// other side's proof, as `role` `"client"` (the side that connected) or `"server"`, within
/// `timeout` seconds. Raises `TransferError` (505 when a side does not hold the secret).
#[pyfunction]
#[pyo3(signature = (fd, role, timeout, *, secret = None, auth = "env"))]
pub(crate) fn authenticate_socket(
    py: Python<'_>,
    fd: i32,
    role: &str,
    timeout: f64,
    secret: Option<&Bound<'_, PyAny>>,
    auth: &str,
) -> PyResult<()> {
    let role = match role {
        "client" => Role::Client,
        "server" => Role::Server,
        other => return Err(PyValueError::new_err(format!("role must be \"client\" or \"server\", got {other:?}"))),
    };
    if fd < 0 {
        return Err(PyValueError::new_err(format!("not a socket: {fd}")));
    }
    let deadline = deadline(timeout)?;
    let auth = Auth::resolve(&auth_config(secret, auth)?).or_raise()?;
    // SAFETY: the caller's socket object keeps owning the descriptor: ManuallyDrop never closes it.
    let mut stream = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
    py.detach(|| auth.authenticate(&mut stream, Channel::Engine, role, deadline)).or_raise()
}
