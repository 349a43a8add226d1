//! A minimal blocking HTTP/1.1 client on std TcpStream with timeouts:
//! keep-alive, HEAD, Content-Length, chunked and read-to-close bodies.
//! It shares no code with ncro, so it can judge ncro's answers.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::IO_TIMEOUT;

/// A parsed HTTP response; `body` is already de-chunked.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this name (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive HTTP/1.1 client connection (blocking, with timeouts).
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Set when the server announced `Connection: close` or ended the body
    /// by closing; further requests then fail with NotConnected.
    closed: bool,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    /// Wraps a stream the caller already used (e.g. to read an interim
    /// response by hand); timeouts are set as for [`Self::connect`].
    pub fn from_stream(stream: TcpStream) -> io::Result<HttpConn> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.request("GET", path, &[])
    }

    /// Sends one request (`Host` added unless given) and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        if self.closed {
            return Err(io::Error::new(
                ErrorKind::NotConnected,
                "server closed this connection",
            ));
        }
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str("Host: ncro-test\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes())?;
        self.read_response(method == "HEAD")
    }

    /// Writes `bytes` as they are, in one write (pipelining, malformed
    /// requests); read the answers with [`Self::read_response`].
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Waits up to `within` for the server to close the connection. True on
    /// EOF or reset; false if it stays open or sends more bytes.
    pub fn wait_closed(&mut self, within: std::time::Duration) -> io::Result<bool> {
        if !self.buf.is_empty() {
            return Ok(false);
        }
        self.stream.set_read_timeout(Some(within))?;
        let mut chunk = [0u8; 4096];
        let result = read_retrying(&mut self.stream, &mut chunk);
        self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
        match result {
            Ok(0) => {
                self.closed = true;
                Ok(true)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(false)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                self.closed = true;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// True once the server has said it will close this connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads a response to a request already written (also for pipelining).
    pub fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let (status, headers) = self.read_head()?;
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.closed = true;
        }
        let bodiless = head_only || status / 100 == 1 || status == 204 || status == 304;
        if bodiless {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = self.read_chunked()?;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| invalid("bad Content-Length"))?;
            resp.body = self.take(len)?;
        } else {
            resp.body = self.read_to_close()?;
            self.closed = true;
        }
        Ok(resp)
    }

    fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 256];
            let mut r = httparse::Response::new(&mut hs);
            match r
                .parse(&self.buf)
                .map_err(|e| invalid(&format!("response head: {e}")))?
            {
                httparse::Status::Complete(n) => {
                    let status = r.code.ok_or_else(|| invalid("no status"))?;
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    self.buf.drain(..n);
                    return Ok((status, headers));
                }
                httparse::Status::Partial => self.fill_or_eof()?,
            }
        }
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size_hex = line.split(';').next().unwrap_or_default().trim();
            let size =
                usize::from_str_radix(size_hex, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailer section: lines until the empty one.
                while !self.line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take(size)?);
            if self.take(2)? != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&l[..i]).into_owned());
            }
            self.fill_or_eof()?;
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill_or_eof()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_to_close(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut rest)?;
        Ok(rest)
    }

    fn fill_or_eof(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        match read_retrying(&mut self.stream, &mut chunk)? {
            0 => {
                self.closed = true;
                Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                ))
            }
            n => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg.to_owned())
}

/// GET `path` from `addr` on a fresh connection.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    HttpConn::connect(addr)?.get(path)
}

/// `read`, retried on EINTR: a blocking read can be interrupted when the
/// test process is stopped and resumed (seen once under CI), which is not a
/// failure of the server under test.
fn read_retrying(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
