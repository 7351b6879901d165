//! Local gRPC clients of a Unix socket do not agree on HTTP/2's `:authority`: kubelet 1.26+
//! sends `localhost`, kubelet 1.25 and older (and grpc-go clients that dial a bare path) send
//! the socket path, which is not a valid authority, and the HTTP/2 server under tonic resets
//! every such stream with PROTOCOL_ERROR. A server on a Unix socket has no use for the
//! authority, so `HeaderRewrite` sits between the socket and the server: it reads the client's
//! frames, decodes each header block (HPACK, keeping the client's dynamic table), lets a
//! function fix the headers, and hands the server the block re-encoded as plain literals (so the
//! server's table stays empty and can never disagree with ours). Every other frame passes
//! through byte for byte; what the server writes is not touched.
//!
//! The same reader plays the old kubelet in the tests: there the function puts the socket path
//! into `:authority`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a peer must accept before its SETTINGS say otherwise.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (the server's own limit is far below).
const MAX_BLOCK: usize = 1 << 20;

/// A decoded header list: (name, value) pairs in order.
pub type Headers = Vec<(Vec<u8>, Vec<u8>)>;

/// Server side: an `:authority` that is not a valid authority becomes `localhost`.
pub fn authority_to_localhost(headers: &mut Headers) {
    for (name, value) in headers.iter_mut() {
        if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
            tracing::debug!(authority = %String::from_utf8_lossy(value), "client sent an invalid :authority; using localhost");
            *value = b"localhost".to_vec();
        }
    }
}

enum Stage {
    /// Bytes of the connection preface still to pass through.
    Preface(usize),
    /// Waiting for a frame header.
    Head,
    /// Passing `n` more payload bytes of a frame through.
    Pass(usize),
    /// Collecting a HEADERS frame (and its CONTINUATIONs) whose header is in `head`.
    Block { head: [u8; FRAME_HEADER], need: usize },
}

/// A stream whose incoming HTTP/2 header blocks are rewritten by `fix`; writes pass through.
pub struct HeaderRewrite<S, F> {
    inner: S,
    fix: F,
    stage: Stage,
    decoder: loona_hpack::Decoder<'static>,
    /// Read from `inner`, not yet parsed.
    input: Vec<u8>,
    /// Parsed, ready for the reader.
    output: Vec<u8>,
    /// The header block being collected: (stream id, flags of the HEADERS frame, fragment).
    block: Option<(u32, u8, Vec<u8>)>,
    eof: bool,
}

impl<S, F: FnMut(&mut Headers)> HeaderRewrite<S, F> {
    pub fn new(inner: S, fix: F) -> Self {
        HeaderRewrite {
            inner,
            fix,
            stage: Stage::Preface(PREFACE_LEN),
            decoder: loona_hpack::Decoder::new(),
            input: Vec::new(),
            output: Vec::new(),
            block: None,
            eof: false,
        }
    }

    /// Moves what can be parsed from `input` to `output`.
    fn parse(&mut self) -> io::Result<()> {
        loop {
            match self.stage {
                Stage::Preface(n) | Stage::Pass(n) => {
                    let take = n.min(self.input.len());
                    if take == 0 && n > 0 {
                        return Ok(());
                    }
                    self.output.extend(self.input.drain(..take));
                    self.stage = if n - take > 0 {
                        match self.stage {
                            Stage::Preface(_) => Stage::Preface(n - take),
                            _ => Stage::Pass(n - take),
                        }
                    } else {
                        Stage::Head
                    };
                }
                Stage::Head => {
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let mut head = [0u8; FRAME_HEADER];
                    head.copy_from_slice(&self.input[..FRAME_HEADER]);
                    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
                    let kind = head[3];
                    if kind == HEADERS || kind == CONTINUATION || self.block.is_some() {
                        self.input.drain(..FRAME_HEADER);
                        self.stage = Stage::Block { head, need: len };
                    } else {
                        self.stage = Stage::Pass(FRAME_HEADER + len);
                    }
                }
                Stage::Block { head, need } => {
                    if self.input.len() < need {
                        return Ok(());
                    }
                    let payload: Vec<u8> = self.input.drain(..need).collect();
                    self.stage = Stage::Head;
                    self.collect(head, &payload)?;
                }
            }
        }
    }

    /// Adds one HEADERS or CONTINUATION frame to the block; a complete block is rewritten.
    fn collect(&mut self, head: [u8; FRAME_HEADER], payload: &[u8]) -> io::Result<()> {
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 from the client: {why}"));
        match (kind, &mut self.block) {
            (HEADERS, None) => {
                let mut frag = payload;
                let mut pad = 0usize;
                if flags & PADDED != 0 {
                    pad = *frag.first().ok_or_else(|| bad("empty padded HEADERS"))? as usize;
                    frag = &frag[1..];
                }
                if flags & PRIORITY != 0 {
                    frag = frag.get(5..).ok_or_else(|| bad("short HEADERS priority"))?;
                }
                let frag = frag.get(..frag.len().checked_sub(pad).ok_or_else(|| bad("padding longer than HEADERS"))?).unwrap_or_default();
                self.block = Some((stream, flags, frag.to_vec()));
            }
            (CONTINUATION, Some((id, _, frag))) if *id == stream => {
                frag.extend_from_slice(payload);
                if frag.len() > MAX_BLOCK {
                    return Err(bad("header block too large"));
                }
            }
            _ => return Err(bad("frame out of order inside a header block")),
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some((stream, first_flags, frag)) = self.block.take() else { return Ok(()) };
        let mut headers = self.decoder.decode(&frag).map_err(|e| bad(&format!("header block: {e}")))?;
        (self.fix)(&mut headers);
        let encoded = encode_literals(&headers);
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block still needs its one frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut f = if first { first_flags & END_STREAM } else { 0 };
            if next.is_none() {
                f |= END_HEADERS;
            }
            let len = chunk.len();
            self.output.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, f]);
            self.output.extend_from_slice(&stream.to_be_bytes());
            self.output.extend_from_slice(chunk);
            first = false;
        }
        Ok(())
    }
}

/// HPACK "literal header field without indexing", new name, no Huffman: the simplest
/// representation, which touches no table.
fn encode_literals(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0);
        for s in [name, value] {
            out.extend(loona_hpack::encoder::encode_integer(s.len(), 7));
            out.extend_from_slice(s);
        }
    }
    out
}

impl<S: AsyncRead + Unpin, F: FnMut(&mut Headers) + Unpin> AsyncRead for HeaderRewrite<S, F> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.input.extend_from_slice(rb.filled());
                    this.parse()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for HeaderRewrite<S, F> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected, F: Clone + Send + Sync + 'static> tonic::transport::server::Connected for HeaderRewrite<S, F> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Two requests whose blocks use the client's dynamic table (the second refers to the
    /// first's entries), one split over a CONTINUATION and padded, with DATA between: the
    /// server side sees both with `localhost` and the DATA untouched.
    #[tokio::test]
    async fn rewrites_authority_across_frames_and_the_dynamic_table() {
        let path = b"/var/lib/kubelet/plugins/lazy-image.csi.dev/csi.sock".as_slice();
        let rpc = b"/csi.v1.Node/NodeGetInfo".as_slice();
        // As grpc-go encodes them: :method POST and :scheme http from the static table, :path
        // and :authority as literals added to the dynamic table (static names 4 and 1)...
        let mut b1 = vec![0x83, 0x86, 0x44, rpc.len() as u8];
        b1.extend_from_slice(rpc);
        b1.extend_from_slice(&[0x41, path.len() as u8]);
        b1.extend_from_slice(path);
        // ...and the next request on the connection refers to those entries (62: the newest).
        let b2 = vec![0x83, 0x86, 0x80 | 63, 0x80 | 62];
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[]));
        let (a, b) = b1.split_at(10);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        wire.extend(frame(HEADERS, PADDED, 1, &padded));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2));

        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut server = HeaderRewrite::new(server, authority_to_localhost);
        // Dribbled one byte at a time: every parse stage must resume.
        let writer = tokio::spawn(async move {
            for byte in wire {
                client.write_all(&[byte]).await.unwrap();
            }
            client.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();

        assert_eq!(&got[..PREFACE_LEN], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut rest = &got[PREFACE_LEN..];
        let mut dec = loona_hpack::Decoder::new();
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let len = (rest[0] as usize) << 16 | (rest[1] as usize) << 8 | rest[2] as usize;
            let (kind, flags, payload) = (rest[3], rest[4], &rest[FRAME_HEADER..FRAME_HEADER + len]);
            if kind == HEADERS {
                assert!(flags & END_HEADERS != 0);
                let h = dec.decode(payload).unwrap();
                let auth = h.iter().find(|(n, _)| n == b":authority").unwrap();
                assert_eq!(auth.1, b"localhost");
                assert!(h.iter().any(|(n, v)| n == b":path" && v == b"/csi.v1.Node/NodeGetInfo"));
                seen.push((kind, flags & END_STREAM));
            } else {
                seen.push((kind, flags));
                if kind == 0 {
                    assert_eq!(payload, b"\0\0\0\0\0");
                }
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        assert_eq!(seen, vec![(0x4, 0), (HEADERS, 0), (0x0, END_STREAM), (HEADERS, END_STREAM)]);
    }

    #[test]
    fn valid_authorities_are_kept() {
        let mut h: Headers = vec![(b":authority".to_vec(), b"localhost".to_vec()), (b"x".to_vec(), b"/a/b".to_vec())];
        authority_to_localhost(&mut h);
        assert_eq!(h[0].1, b"localhost");
        assert_eq!(h[1].1, b"/a/b", "only :authority is touched");
        let mut h: Headers = vec![(b":authority".to_vec(), b"/csi/csi.sock".to_vec())];
        authority_to_localhost(&mut h);
        assert_eq!(h[0].1, b"localhost");
    }
}
