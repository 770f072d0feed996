//! Redis clients: refusals are RESP error replies, which every client shows
//! as the answer to its first command.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Refusal;

/// How long to wait for the client's first command, and then for it to go
/// away, around an error reply.
const LINGER: Duration = Duration::from_millis(500);

/// The RESP error line for a refusal.
pub fn error_line(refusal: &Refusal) -> String {
    // A RESP error is one line: no CR or LF may come from an error text.
    let message: String = refusal
        .message()
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    match refusal {
        Refusal::NoMember { .. } => format!("-TRYAGAIN {message}\r\n"),
        Refusal::MaxConnections => "-ERR max number of clients reached\r\n".to_string(),
        Refusal::ShuttingDown => format!("-ERR {message}\r\n"),
    }
}

/// Reads the client's first command (briefly), answers the error, closes.
///
/// Reading first and draining after keeps the kernel from answering the
/// client's unread command with a reset that would discard the reply.
pub async fn refuse<S>(stream: &mut S, refusal: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(LINGER, stream.read(&mut buf)).await;
    let _ = stream.write_all(error_line(refusal).as_bytes()).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A plaintext client on a TLS endpoint: tell it so in RESP, then close.
pub async fn refuse_plaintext<S>(stream: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(LINGER, stream.read(&mut buf)).await;
    let _ = stream
        .write_all(b"-ERR portal: this endpoint requires TLS (redis-cli --tls --cacert CA)\r\n")
        .await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_single_resp_error_lines() {
        for refusal in [
            Refusal::NoMember {
                cluster: "cache".into(),
                waited: Duration::from_secs(1),
                split_brain: true,
                no_replica: false,
                connect_error: None,
            },
            Refusal::NoMember {
                cluster: "cache".into(),
                waited: Duration::from_secs(1),
                split_brain: false,
                no_replica: false,
                connect_error: Some("refused\r\n-injected".into()),
            },
            Refusal::MaxConnections,
            Refusal::ShuttingDown,
        ] {
            let line = error_line(&refusal);
            assert!(line.starts_with('-'), "{line}");
            assert!(line.ends_with("\r\n"));
            assert_eq!(line.matches("\r\n").count(), 1);
        }
    }
}
