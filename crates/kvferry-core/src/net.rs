//! A listening socket served by a thread that stops when its [`Acceptor`] is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::{Error, Result};

pub(crate) struct Acceptor {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Bind `listen` and hand every accepted connection to `serve` on a thread of its own, so a
    /// slow or stuck peer never holds up the others.
    pub fn spawn(
        listen: SocketAddr,
        name: &str,
        serve: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Result<Acceptor> {
        let listener = TcpListener::bind(listen).map_err(|e| Error::io(format!("binding {listen}"), e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let serve = Arc::new(serve);
        let conn_name = format!("{name}-conn");
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    match stream {
                        Ok(stream) => {
                            let serve = serve.clone();
                            if let Err(e) = thread::Builder::new().name(conn_name.clone()).spawn(move || serve(stream))
                            {
                                tracing::error!(error = %e, "cannot spawn a connection thread");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "accept failed"),
                    }
                }
            })
            .map_err(|e| Error::io("spawning an accept thread", e))?;
        Ok(Acceptor { addr, stopping, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // `accept` has no timeout: a connection of our own wakes it to see the flag.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}
