//! Bounded reads of HTTP bodies: what a peer answers is read only up to what the request can
//! call for, so that no answer, however long, costs more memory than that.

/// How much of an error's body is read: enough for any problem document.
pub const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Reads at most `limit` bytes of a response body; the flag says whether that was all of it.
/// A body whose declared length exceeds the limit is not read at all.
pub async fn read_at_most(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let declared = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok((Vec::new(), false));
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok((bytes, false));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((bytes, true))
}

/// One-shot HTTP servers for tests.
#[cfg(feature = "test-util")]
pub mod testing {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads a request up to the end of its head (and whatever came with it); `None` if the
    /// connection ends first.
    pub async fn read_head(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        Some(head)
    }

    /// A server on a loopback port of its own that reads one request's head and answers it with
    /// `answer`, raw bytes of HTTP/1.1; returns its `http://…/` URL.
    pub async fn answer_once(answer: &'static str) -> url::Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            if read_head(&mut socket).await.is_some() {
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        url::Url::parse(&url).expect("url")
    }

    /// A server on a loopback port of its own that answers every request with `answer` (which
    /// should close the connection: `connection: close`) until the test's runtime ends; returns
    /// its `http://…/` URL.
    pub async fn answer_always(answer: &'static str) -> url::Url {
        answer_each(move |_| answer.as_bytes().to_vec()).await
    }

    /// A server on a loopback port of its own that answers each request with the raw HTTP/1.1
    /// bytes `answer` makes of the request's head (which should close the connection) until the
    /// test's runtime ends; returns its `http://…/` URL.
    pub async fn answer_each(
        answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) -> url::Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let answer = std::sync::Arc::clone(&answer);
                tokio::spawn(async move {
                    if let Some(head) = read_head(&mut socket).await {
                        let _ = socket.write_all(&answer(&head)).await;
                    }
                });
            }
        });
        url::Url::parse(&url).expect("url")
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LIMIT: usize = 1 << 20;
    /// What the server below sends at most: far more than `LIMIT`.
    const ENDLESS: usize = 64 << 20;

    /// A server on a port of its own that answers one request with a chunked body of up to
    /// `ENDLESS` bytes, counting what it managed to write.
    async fn endless() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let written = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&written);
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let block = [b'x'; 64 * 1024];
            while counter.load(Ordering::SeqCst) < ENDLESS {
                let mut framed = format!("{:x}\r\n", block.len()).into_bytes();
                framed.extend_from_slice(&block);
                framed.extend_from_slice(b"\r\n");
                if socket.write_all(&framed).await.is_err() {
                    return;
                }
                counter.fetch_add(block.len(), Ordering::SeqCst);
            }
            let _ = socket.write_all(b"0\r\n\r\n").await;
        });
        (url, written)
    }

    async fn read(url: &str) -> (usize, bool) {
        let response = reqwest::get(url).await.expect("response");
        let (body, whole) = read_at_most(response, LIMIT).await.expect("read");
        (body.len(), whole)
    }

    #[tokio::test]
    async fn a_body_longer_than_the_limit_is_not_read_past_it() {
        let (url, written) = endless().await;
        assert_eq!(read(&url).await, (LIMIT, false));
        // What the sockets' buffers took in besides, not the rest of the body.
        assert!(written.load(Ordering::SeqCst) < ENDLESS / 2);
    }

    #[tokio::test]
    async fn a_body_declared_longer_than_the_limit_is_not_read() {
        let url =
            testing::answer_once("HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\n\r\nxx").await;
        assert_eq!(read(url.as_str()).await, (0, false));
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_whole() {
        let url = testing::answer_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        assert_eq!(read(url.as_str()).await, (5, true));
    }
}
