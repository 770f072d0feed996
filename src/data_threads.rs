//! The threads that run the data path: one single-threaded tokio runtime per
//! thread (by default one per CPU), each with its own accept loop on every
//! endpoint's listening socket. The kernel hands a new connection to one of
//! the threads waiting in `accept`, and the session (handshake, routing,
//! relay, both sockets, its timers) then lives on that thread until it ends:
//! no task moves between threads, no wakeup crosses one. Measured against
//! tokio's work-stealing runtime on the same keep-alive load, this takes 15%
//! less CPU per request (README, "How the data path works").
//!
//! Probes, views, DCS sources, the admin API and reloads run on a separate
//! one-thread runtime (`cli.rs`), so a probe never waits in a data thread's
//! queue of session tasks.

use std::io;
use std::net::SocketAddr;
use std::thread;

use socket2::{Domain, Socket, Type};
use tokio::runtime::{Builder, Handle};

/// The backlog of an endpoint's listening socket (mio's and HAProxy's
/// default is 1024; the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 1024;

/// Handles to the running data threads; cloning one clones handles only.
#[derive(Clone)]
pub struct DataThreads {
    handles: Vec<Handle>,
}

impl DataThreads {
    /// Starts `count` threads (at least one), or one per CPU when `None`.
    /// They run until the process exits.
    pub fn start(count: Option<usize>) -> io::Result<DataThreads> {
        let count = DataThreads::count(count);
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            thread::Builder::new()
                .name(format!("portal-data-{i}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        Ok(DataThreads { handles })
    }

    /// How many threads `start(count)` starts.
    pub fn count(count: Option<usize>) -> usize {
        count
            .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// A non-blocking listening socket on `addr`, registered with no runtime:
/// each data thread registers its own duplicate of it (`proxy::serve`).
pub fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_data_thread_runs_its_own_runtime() {
        let threads = DataThreads::start(Some(2)).expect("data threads");
        assert_eq!(threads.len(), 2);
        let names: Vec<String> = threads
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let _ = tx.send(thread::current().name().map(str::to_owned));
                });
                rx.recv().expect("ran").expect("named")
            })
            .collect();
        assert_eq!(names, ["portal-data-0", "portal-data-1"]);
    }

    #[test]
    fn zero_threads_means_one() {
        assert_eq!(DataThreads::start(Some(0)).expect("data threads").len(), 1);
    }

    #[test]
    fn a_listener_can_be_duplicated_for_each_thread() {
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let copy = listener.try_clone().expect("dup");
        assert_eq!(copy.local_addr().expect("addr"), addr);
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        // Either copy accepts: they are one socket.
        let accepted = loop {
            match copy.accept() {
                Ok(accepted) => break accepted,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(err) => panic!("accept: {err}"),
            }
        };
        assert_eq!(accepted.0.local_addr().expect("addr"), addr);
    }
}
