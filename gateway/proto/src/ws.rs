//! The WebSocket transport of the tunnel: a byte stream carried in binary WebSocket messages,
//! for networks whose proxies inspect TLS and so cannot pass HTTP/2 or client certificates.
//!
//! The gateway opens `wss://<SaaS>/v1/tunnel/ws` (through its proxy, whose TLS the proxy may
//! inspect) with the subprotocol [`SUBPROTOCOL`]. Inside that WebSocket runs, as a plain byte
//! stream, the very same mutually authenticated TLS and HTTP/2 the direct tunnel uses, end to end
//! to the SaaS: the broker sees the gateway's certificate, the proxy sees ciphertext.
//! [`WsBytes`] turns a WebSocket into that byte stream on both sides.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Path of the WebSocket endpoint on the SaaS's REST listener.
pub const PATH: &str = "/v1/tunnel/ws";
/// WebSocket subprotocol both sides require.
pub const SUBPROTOCOL: &str = "pcg-tunnel.v1";

pub use tokio_tungstenite;

/// A WebSocket as a byte stream: each write is one binary message; reads return the bytes of
/// binary messages in order. Text messages are a protocol error; pings are answered by the
/// WebSocket layer; a close message is the end of the stream.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    pending: bytes::Bytes,
    eof: bool,
}

impl<S> WsBytes<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsBytes {
            ws,
            pending: bytes::Bytes::new(),
            eof: false,
        }
    }
}

fn io_err(e: tungstenite::Error) -> std::io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            std::io::Error::from(std::io::ErrorKind::BrokenPipe)
        }
        e => std::io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => self.eof = true,
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a text message on the tunnel's WebSocket",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_err)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(bytes::Bytes::copy_from_slice(buf)))
            .map_err(io_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[tokio::test]
    async fn bytes_cross_a_websocket_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let (mut c, mut s) = (WsBytes::new(client), WsBytes::new(server));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            c.write_all(&big).await.expect("write");
            c.flush().await.expect("flush");
            let mut back = [0u8; 5];
            c.read_exact(&mut back).await.expect("read back");
            assert_eq!(&back, b"thank");
            c.shutdown().await.expect("close");
        });
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expect);
        s.write_all(b"thank").await.expect("write");
        s.flush().await.expect("flush");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty());
        writer.await.expect("writer");
    }
}
