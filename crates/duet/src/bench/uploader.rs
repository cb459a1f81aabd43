//! The bench's upload client: pre-encoded reports over keep-alive HTTP/1.1 connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use duet_messages::dap09::media_type;

use super::now;

/// Uploads every body to `url` over `concurrency` keep-alive connections, with a progress bar;
/// returns the seconds it took. Any refused upload fails the run.
///
/// The bench client shares the machine with the servers, so it is kept lean, like a load
/// generator (`wrk`, `h2load`): each connection writes a whole HTTP/1.1 request with one system
/// call and reads the answer with as few as it can, one request in flight at a time.
///
/// The connections run on one thread of their own with a single-threaded runtime, as `wrk`
/// runs each of its threads' connections: no task wakes another thread, so the client's share
/// of the cores goes on its requests rather than on thread wake-ups.
pub(super) async fn upload_all(
    url: &url::Url,
    bodies: &Arc<[bytes::Bytes]>,
    concurrency: usize,
    label: &'static str,
) -> Result<f64> {
    let target = UploadTarget::new(url)?;
    let bodies = Arc::clone(bodies);
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-upload".into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("could not start the upload client's runtime")
                .and_then(|rt| rt.block_on(upload_on(target, bodies, concurrency, label)));
            let _ = done.send(outcome);
        })
        .context("could not start the upload client's thread")?;
    result.await.context("the upload client's thread stopped")?
}

/// [`upload_all`] on the current (single-threaded) runtime.
async fn upload_on(
    target: Arc<UploadTarget>,
    bodies: Arc<[bytes::Bytes]>,
    concurrency: usize,
    label: &'static str,
) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let pb = crate::upload::progress_bar(bodies.len() as u64, label);
    let t0 = now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, next, bodies, pb) = (
            Arc::clone(&target),
            Arc::clone(&next),
            Arc::clone(&bodies),
            pb.clone(),
        );
        workers.spawn(async move {
            let mut conn: Option<UploadConnection> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return Ok::<(), anyhow::Error>(());
                };
                target
                    .put(&mut conn, body)
                    .await
                    .with_context(|| format!("upload {i}"))?;
                pb.inc(1);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    pb.finish_and_clear();
    Ok(t0.elapsed().as_secs_f64())
}

/// Where [`upload_all`] sends reports: a plain-HTTP Leader.
struct UploadTarget {
    /// `host:port` to connect to.
    addr: String,
    /// The request line and the headers every upload shares, up to `content-length: `.
    head: Vec<u8>,
}

/// One keep-alive connection and its read buffer.
struct UploadConnection {
    stream: tokio::net::TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
}

/// Largest response head the bench accepts from the Leader.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

impl UploadTarget {
    fn new(url: &url::Url) -> Result<Arc<UploadTarget>> {
        if url.scheme() != "http" {
            bail!("the bench uploads over plain HTTP, not to {url}");
        }
        let host = url.host_str().context("the upload URL has no host")?;
        let port = url
            .port_or_known_default()
            .context("the upload URL has no port")?;
        let addr = format!("{host}:{port}");
        let head = format!(
            "PUT {} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {}\r\ncontent-length: ",
            url.path(),
            media_type::REPORT
        )
        .into_bytes();
        Ok(Arc::new(UploadTarget { addr, head }))
    }

    /// Uploads one report, on `conn` or a new connection; a connection the server closed is
    /// replaced once.
    async fn put(&self, conn: &mut Option<UploadConnection>, body: &[u8]) -> Result<()> {
        let mut reconnected = false;
        loop {
            let c = match conn {
                Some(c) => c,
                None => {
                    let stream = tokio::net::TcpStream::connect(&self.addr)
                        .await
                        .with_context(|| format!("connecting to {}", self.addr))?;
                    stream.set_nodelay(true)?;
                    conn.insert(UploadConnection {
                        stream,
                        request: Vec::new(),
                        response: Vec::new(),
                    })
                }
            };
            match c.round_trip(&self.head, body).await {
                Ok(()) => return Ok(()),
                Err(UploadError::Closed) if !reconnected => {
                    reconnected = true;
                    *conn = None;
                }
                Err(UploadError::Closed) => bail!("the Leader closed the connection"),
                Err(UploadError::Failed(e)) => return Err(e),
            }
        }
    }
}

/// Why an upload round trip failed.
enum UploadError {
    /// The connection was closed before any of the answer arrived (the request may be retried on
    /// a new connection).
    Closed,
    Failed(anyhow::Error),
}

impl From<std::io::Error> for UploadError {
    fn from(e: std::io::Error) -> Self {
        UploadError::Failed(e.into())
    }
}

impl UploadConnection {
    async fn round_trip(&mut self, head: &[u8], body: &[u8]) -> Result<(), UploadError> {
        use std::io::Write as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        self.request.clear();
        self.request.extend_from_slice(head);
        write!(self.request, "{}\r\n\r\n", body.len())?;
        self.request.extend_from_slice(body);
        if let Err(e) = self.stream.write_all(&self.request).await {
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    UploadError::Closed
                }
                _ => e.into(),
            });
        }
        // Read until the head and the `content-length` bytes of body after it are in.
        self.response.clear();
        self.response.reserve(4096);
        let (status, head_len, content_length) = loop {
            if let Some(end) = find(&self.response, b"\r\n\r\n") {
                let head_len = end + 4;
                let (status, content_length) =
                    parse_response_head(&self.response[..head_len]).map_err(UploadError::Failed)?;
                if self.response.len() >= head_len + content_length {
                    break (status, head_len, content_length);
                }
            } else if self.response.len() > MAX_RESPONSE_HEAD {
                return Err(UploadError::Failed(anyhow::anyhow!(
                    "the Leader's response head is over {MAX_RESPONSE_HEAD} bytes"
                )));
            }
            let n = match self.stream.read_buf(&mut self.response).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(if self.response.is_empty() {
                    UploadError::Closed
                } else {
                    UploadError::Failed(anyhow::anyhow!(
                        "the Leader closed the connection mid-answer"
                    ))
                });
            }
        };
        if !(200..300).contains(&status) {
            let body = &self.response[head_len..head_len + content_length];
            return Err(UploadError::Failed(anyhow::anyhow!(
                "refused: {status} {}",
                String::from_utf8_lossy(body)
            )));
        }
        Ok(())
    }
}

/// The status code and `content-length` of an HTTP/1.1 response head.
fn parse_response_head(head: &[u8]) -> Result<(u16, usize)> {
    let text = std::str::from_utf8(head).context("the Leader's response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("unexpected status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("the bench client reads only content-length framed responses");
        }
    }
    Ok((status, content_length.unwrap_or(0)))
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_give_their_status_and_length() {
        let (status, len) = parse_response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\ndate: Wed, 25 Nov 2026 00:00:00 GMT\r\n\r\n",
        )
        .expect("a valid head");
        assert_eq!((status, len), (200, 0));
        let (status, len) = parse_response_head(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 57\r\n\r\n",
        )
        .expect("a valid head");
        assert_eq!((status, len), (400, 57));
    }

    #[test]
    fn response_heads_the_client_cannot_read_are_errors() {
        for head in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        ] {
            assert!(
                parse_response_head(head).is_err(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn find_locates_the_end_of_a_head() {
        assert_eq!(find(b"ab\r\n\r\ncd", b"\r\n\r\n"), Some(2));
        assert_eq!(find(b"ab\r\n", b"\r\n\r\n"), None);
    }
}
