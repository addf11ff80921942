//! Framing: one msgpack value per message, read incrementally under a size limit.
//!
//! msgpack has no length prefix, so [`frame_len`] walks the buffered bytes to
//! find where the first value ends. It reads only headers, never allocates, and
//! checks every declared length (str, bin, ext, array, map) against the limit
//! before anything of that size is buffered or decoded: a peer cannot make the
//! reader allocate more than the limit by declaring a 4 GB string.

use std::io;

use bytes::BytesMut;
use rmpv::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{ErrorCode, RpcError};
use crate::message::{InvalidMessage, Message};

/// The default largest message a reader accepts: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How much room a read asks for when the buffered bytes hold no complete message.
const READ_CHUNK: usize = 8 << 10;

/// Why bytes could not become a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The bytes are not msgpack. The stream cannot be resynchronised.
    #[error("malformed msgpack: {0}")]
    Malformed(String),
    /// The message is, or declares itself to be, larger than the limit.
    #[error("message of at least {at_least} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// A lower bound on the message's size, from what has been read or declared.
        at_least: u64,
        /// The configured limit.
        limit: usize,
    },
}

impl FrameError {
    /// The error to send before closing the connection: `parse_error` or
    /// `message_too_large`.
    pub fn to_rpc_error(&self) -> RpcError {
        let code = match self {
            FrameError::Malformed(_) => ErrorCode::ParseError,
            FrameError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        };
        RpcError::new(code, self.to_string())
    }
}

/// Why [`MessageReader::read_message`] returned no message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading from the underlying stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The bytes were not msgpack, or were too large; the stream is unusable.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed the stream in the middle of a message.
    #[error("connection closed in the middle of a message ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete message that had arrived.
        buffered: usize,
    },
    /// A complete msgpack value that is not a msgpack-RPC message. It has been
    /// consumed, so reading may go on.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
}

impl ReadError {
    /// Whether the stream can still be read after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, ReadError::Invalid(_))
    }

    /// The error to report to the peer, when there is one worth sending.
    pub fn to_rpc_error(&self) -> Option<RpcError> {
        match self {
            ReadError::Io(_) | ReadError::Truncated { .. } => None,
            ReadError::Frame(error) => Some(error.to_rpc_error()),
            ReadError::Invalid(invalid) => Some(invalid.error.clone()),
        }
    }
}

/// The length of the first complete msgpack value in `buf`, `Ok(None)` if more
/// bytes are needed, or an error if the bytes are not msgpack or the value
/// cannot fit in `limit` bytes.
pub fn frame_len(buf: &[u8], limit: usize) -> Result<Option<usize>, FrameError> {
    FrameScanner::new().scan(buf, limit)
}

/// Finds where one msgpack value ends, resuming where the last call stopped so
/// that a message arriving in many reads is walked once, not once per read.
///
/// The walk is iterative: it counts the values still owed by open arrays and
/// maps, so neither deep nesting nor huge declared counts cost stack or memory.
/// Every owed value takes at least one byte, which bounds counts by the limit too.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    /// Offset of the next header to read (or the end of a payload still arriving).
    pos: usize,
    /// Values still to read: the message itself, then the elements of open containers.
    owed: u64,
}

impl Default for FrameScanner {
    fn default() -> Self {
        FrameScanner::new()
    }
}

impl FrameScanner {
    /// A scanner at the start of a message.
    pub fn new() -> FrameScanner {
        FrameScanner { pos: 0, owed: 1 }
    }

    /// Walks `buf`, which must begin with the bytes given to earlier calls since
    /// the last complete message. Returns the message's length once it is all
    /// there, and is then ready for the next message.
    pub fn scan(&mut self, buf: &[u8], limit: usize) -> Result<Option<usize>, FrameError> {
        let limit_u64 = limit as u64;
        while self.owed > 0 {
            let at_least = self.pos as u64 + self.owed;
            if at_least > limit_u64 {
                return Err(FrameError::TooLarge { at_least, limit });
            }
            let pos = self.pos;
            let Some(&marker) = buf.get(pos) else {
                return Ok(None);
            };
            let (length, body) = header(marker).ok_or_else(|| {
                FrameError::Malformed(format!(
                    "byte {marker:#04x} at offset {pos} is not a msgpack marker"
                ))
            })?;
            let (declared, header_end) = match length {
                Length::InMarker(n) => (n, pos + 1),
                Length::Following(width) => {
                    let Some(bytes) = buf.get(pos + 1..pos + 1 + width) else {
                        return Ok(None);
                    };
                    let n = bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
                    (n, pos + 1 + width)
                }
            };
            let (payload, elements) = match body {
                Body::Fixed(bytes) => (u64::from(bytes), 0),
                Body::Bytes { extra } => (declared + u64::from(extra), 0),
                Body::Elements { per_entry } => (0, declared * u64::from(per_entry)),
            };
            let end = header_end as u64 + payload;
            if end > limit_u64 {
                return Err(FrameError::TooLarge {
                    at_least: end,
                    limit,
                });
            }
            self.owed = self.owed - 1 + elements;
            // `end` is at most `limit`, so it fits in usize.
            self.pos = end as usize;
        }
        if self.pos > buf.len() {
            // The last payload is still arriving.
            return Ok(None);
        }
        Ok(Some(std::mem::take(self).pos))
    }
}

/// Where a msgpack value's length or element count is.
enum Length {
    /// In the marker byte itself (fix types; 0 where there is none).
    InMarker(u64),
    /// In this many big-endian bytes after the marker.
    Following(usize),
}

/// What the length or count of a msgpack value measures.
enum Body {
    /// A payload of a fixed size: ints, floats, fixext; none for nil and bools.
    Fixed(u8),
    /// A payload of the declared length plus `extra` bytes (ext adds its type byte).
    Bytes { extra: u8 },
    /// The declared number of entries, each `per_entry` values (arrays 1, maps 2).
    Elements { per_entry: u8 },
}

/// How to find the end of a value starting with `marker`; `None` for 0xc1,
/// the one byte msgpack never uses.
fn header(marker: u8) -> Option<(Length, Body)> {
    use Body::*;
    use Length::*;
    let bytes = Bytes { extra: 0 };
    let ext = Bytes { extra: 1 };
    let array = Elements { per_entry: 1 };
    let map = Elements { per_entry: 2 };
    Some(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (InMarker(0), Fixed(0)),
        0x80..=0x8f => (InMarker(u64::from(marker & 0x0f)), map),
        0x90..=0x9f => (InMarker(u64::from(marker & 0x0f)), array),
        0xa0..=0xbf => (InMarker(u64::from(marker & 0x1f)), bytes),
        0xc1 => return None,
        0xc4 | 0xd9 => (Following(1), bytes),
        0xc5 | 0xda => (Following(2), bytes),
        0xc6 | 0xdb => (Following(4), bytes),
        0xc7 => (Following(1), ext),
        0xc8 => (Following(2), ext),
        0xc9 => (Following(4), ext),
        0xcc | 0xd0 => (InMarker(0), Fixed(1)),
        0xcd | 0xd1 => (InMarker(0), Fixed(2)),
        0xca | 0xce | 0xd2 => (InMarker(0), Fixed(4)),
        0xcb | 0xcf | 0xd3 => (InMarker(0), Fixed(8)),
        0xd4 => (InMarker(0), Fixed(2)),
        0xd5 => (InMarker(0), Fixed(3)),
        0xd6 => (InMarker(0), Fixed(5)),
        0xd7 => (InMarker(0), Fixed(9)),
        0xd8 => (InMarker(0), Fixed(17)),
        0xdc => (Following(2), array),
        0xdd => (Following(4), array),
        0xde => (Following(2), map),
        0xdf => (Following(4), map),
    })
}

/// Reads messages from a byte stream, one msgpack value each, refusing any
/// message larger than the limit before it is buffered in full.
#[derive(Debug)]
pub struct MessageReader<R> {
    /// The byte stream, usually the read half of a socket.
    inner: R,
    /// Bytes read but not yet returned as messages.
    buf: BytesMut,
    /// Where the scan of the first buffered message stopped.
    scanner: FrameScanner,
    /// The largest message accepted, in bytes.
    limit: usize,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    /// A reader over `inner` accepting messages of at most `limit` bytes.
    pub fn new(inner: R, limit: usize) -> MessageReader<R> {
        MessageReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            scanner: FrameScanner::new(),
            limit,
        }
    }

    /// The largest message accepted, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The next message, or `Ok(None)` when the peer closed the stream between
    /// messages.
    ///
    /// Cancel-safe: if the future is dropped (e.g. in `tokio::select!`), bytes
    /// already read stay buffered for the next call.
    ///
    /// After [`ReadError::Invalid`] the offending value has been consumed and
    /// reading may go on; after any other error the stream is unusable.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            if let Some(len) = self.scanner.scan(&self.buf, self.limit)? {
                let frame = self.buf.split_to(len);
                return decode_frame(&frame).map(Some);
            }
            self.buf.reserve(READ_CHUNK);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(ReadError::Truncated { buffered }),
                };
            }
        }
    }

    /// Whether part of a message has arrived and the rest has not.
    pub fn has_partial_message(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// The bytes of `message` on the wire.
pub fn encode(message: &Message) -> Vec<u8> {
    encode_value(&message.to_value())
}

/// The bytes of `value` on the wire.
pub fn encode_value(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).expect("writing to a Vec cannot fail");
    bytes
}

/// Reads one message from the start of `bytes`: the message and the number of
/// bytes it took, or `Ok(None)` if `bytes` holds only part of one.
pub fn decode(bytes: &[u8], limit: usize) -> Result<Option<(Message, usize)>, ReadError> {
    let Some(len) = frame_len(bytes, limit)? else {
        return Ok(None);
    };
    Ok(Some((decode_frame(&bytes[..len])?, len)))
}

/// Decodes one complete msgpack value, already bounded by [`frame_len`].
fn decode_frame(mut frame: &[u8]) -> Result<Message, ReadError> {
    let value = rmpv::decode::read_value(&mut frame)
        .map_err(|error| FrameError::Malformed(error.to_string()))?;
    Ok(Message::from_value(value)?)
}

/// Writes `message` to `writer` and flushes it.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> io::Result<()> {
    writer.write_all(&encode(message)).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;
    use crate::message::{Notification, Request, Response};

    /// A stream that hands out its bytes in the given pieces, one piece per read.
    struct Pieces(VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn reader_of(pieces: Vec<Vec<u8>>, limit: usize) -> MessageReader<Pieces> {
        MessageReader::new(Pieces(pieces.into()), limit)
    }

    fn hello(msgid: u32) -> Message {
        Request::new(msgid, "hello", &()).unwrap().into()
    }

    #[tokio::test]
    async fn a_message_split_across_reads_decodes_once_complete() {
        let message: Message = Notification {
            method: "token".into(),
            params: Value::Map(vec![(Value::from("text"), Value::from("x".repeat(300)))]),
        }
        .into();
        let bytes = encode(&message);
        for split in 1..bytes.len() {
            let pieces = vec![bytes[..split].to_vec(), bytes[split..].to_vec()];
            let mut reader = reader_of(pieces, 1024);
            assert_eq!(reader.read_message().await.unwrap(), Some(message.clone()));
            assert_eq!(reader.read_message().await.unwrap(), None);
        }
        let one_byte_each = bytes.iter().map(|&b| vec![b]).collect();
        let mut reader = reader_of(one_byte_each, 1024);
        assert_eq!(reader.read_message().await.unwrap(), Some(message));
    }

    #[tokio::test]
    async fn two_messages_in_one_read_decode_in_order() {
        let first = hello(1);
        let second: Message = Response::ok(1, Value::from(true)).into();
        let mut bytes = encode(&first);
        bytes.extend(encode(&second));
        let mut reader = reader_of(vec![bytes], 1024);
        assert_eq!(reader.read_message().await.unwrap(), Some(first));
        assert_eq!(reader.read_message().await.unwrap(), Some(second));
        assert_eq!(reader.read_message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn malformed_msgpack_is_a_parse_error() {
        let mut reader = reader_of(vec![vec![0x94, 0x00, 0x01, 0xc1]], 1024);
        let error = reader.read_message().await.unwrap_err();
        assert!(
            matches!(error, ReadError::Frame(FrameError::Malformed(_))),
            "{error}"
        );
        assert!(!error.is_recoverable());
        assert_eq!(error.to_rpc_error().unwrap().code, ErrorCode::ParseError);
    }

    #[test]
    fn nesting_deeper_than_the_decoder_allows_is_malformed() {
        let mut bytes = vec![0x91; 5000];
        bytes.push(0xc0);
        let error = decode(&bytes, 1 << 20).unwrap_err();
        assert!(
            matches!(error, ReadError::Frame(FrameError::Malformed(_))),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_declared_4gb_string_is_refused_before_it_is_buffered() {
        // str32 declaring 0xffff_ffff bytes, followed by a trickle of content
        // that would never end if the reader waited for it.
        let header = vec![0xdb, 0xff, 0xff, 0xff, 0xff];
        let mut reader = reader_of(vec![header, vec![b'a'; 100]], DEFAULT_MAX_MESSAGE_BYTES);
        let error = reader.read_message().await.unwrap_err();
        assert!(
            matches!(
                error,
                ReadError::Frame(FrameError::TooLarge {
                    at_least: 0x1_0000_0004,
                    ..
                })
            ),
            "{error}"
        );
        assert_eq!(
            error.to_rpc_error().unwrap().code,
            ErrorCode::MessageTooLarge
        );
        assert!(reader.buf.capacity() <= 2 * READ_CHUNK);
    }

    #[test]
    fn declared_lengths_of_every_kind_are_checked_against_the_limit() {
        let limit = 1000;
        let cases: [&[u8]; 5] = [
            &[0xc6, 0x00, 0x01, 0x00, 0x00],       // bin32 of 64 KiB
            &[0xc9, 0x00, 0x00, 0x04, 0x00, 0x01], // ext32 of 1 KiB + type byte
            &[0xda, 0x04, 0x00],                   // str16 of 1 KiB
            &[0xdd, 0xff, 0xff, 0xff, 0xff],       // array32 of 4 G elements
            &[0xde, 0x01, 0xf4],                   // map16 of 500 entries = 1000 values
        ];
        for bytes in cases {
            assert!(
                matches!(frame_len(bytes, limit), Err(FrameError::TooLarge { .. })),
                "{bytes:02x?}"
            );
        }
        // Just under the limit: 3 header bytes + 997 content bytes, still arriving.
        assert!(matches!(frame_len(&[0xda, 0x03, 0xe5], limit), Ok(None)));
    }

    #[tokio::test]
    async fn a_message_growing_past_the_limit_is_refused_before_it_ends() {
        // An array of 100 strings of 20 bytes each: every header is small, but
        // the whole is about 2 KiB against a 1 KiB limit.
        let mut value = Vec::new();
        rmpv::encode::write_value(
            &mut value,
            &Value::Array(vec![Value::from("y".repeat(20)); 100]),
        )
        .unwrap();
        let pieces: Vec<Vec<u8>> = value.chunks(64).map(<[u8]>::to_vec).collect();
        let total = pieces.len();
        let mut reader = reader_of(pieces, 1024);
        let error = reader.read_message().await.unwrap_err();
        assert!(
            matches!(error, ReadError::Frame(FrameError::TooLarge { .. })),
            "{error}"
        );
        let unread = reader.inner.0.len();
        assert!(
            unread > 0 && unread < total,
            "{unread} of {total} pieces unread"
        );
    }

    #[tokio::test]
    async fn a_message_exactly_at_the_limit_is_accepted() {
        let message = hello(1);
        let bytes = encode(&message);
        let mut reader = reader_of(vec![bytes.clone()], bytes.len());
        assert_eq!(reader.read_message().await.unwrap(), Some(message));
        let mut reader = reader_of(vec![bytes.clone()], bytes.len() - 1);
        assert!(reader.read_message().await.is_err());
    }

    #[tokio::test]
    async fn an_invalid_message_is_skipped_and_reading_goes_on() {
        let mut bytes = encode_value(&Value::from("not a message"));
        bytes.extend(encode(&hello(2)));
        let mut reader = reader_of(vec![bytes], 1024);
        let error = reader.read_message().await.unwrap_err();
        assert!(error.is_recoverable());
        assert_eq!(
            error.to_rpc_error().unwrap().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(reader.read_message().await.unwrap(), Some(hello(2)));
    }

    #[tokio::test]
    async fn a_stream_ending_mid_message_is_truncated() {
        let bytes = encode(&hello(1));
        let mut reader = reader_of(vec![bytes[..4].to_vec()], 1024);
        assert!(matches!(
            reader.read_message().await,
            Err(ReadError::Truncated { buffered: 4 })
        ));
    }

    #[test]
    fn frame_len_knows_every_fixed_size_type() {
        let values = [
            Value::Nil,
            Value::from(true),
            Value::from(-3),
            Value::from(200u8),
            Value::from(60_000u16),
            Value::from(4_000_000_000u32),
            Value::from(u64::MAX),
            Value::from(-100i8),
            Value::from(-30_000i16),
            Value::from(-2_000_000_000i32),
            Value::from(i64::MIN),
            Value::F32(1.5),
            Value::F64(2.5),
            Value::Ext(1, vec![0; 1]),
            Value::Ext(1, vec![0; 2]),
            Value::Ext(1, vec![0; 4]),
            Value::Ext(1, vec![0; 8]),
            Value::Ext(1, vec![0; 16]),
            Value::Ext(1, vec![0; 3]),
            Value::Binary(vec![1, 2, 3]),
            Value::from("s".repeat(40)),
            Value::from("s".repeat(300)),
            Value::Array(vec![Value::Nil; 20]),
            Value::Map(vec![(Value::Nil, Value::Nil); 20]),
        ];
        for value in values {
            let mut bytes = encode_value(&value);
            let len = bytes.len();
            assert_eq!(frame_len(&bytes, 1 << 20).unwrap(), Some(len), "{value}");
            for cut in 0..len {
                assert_eq!(frame_len(&bytes[..cut], 1 << 20).unwrap(), None, "{value}");
            }
            bytes.push(0xc0);
            assert_eq!(frame_len(&bytes, 1 << 20).unwrap(), Some(len), "{value}");
        }
    }
}
