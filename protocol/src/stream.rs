//! Framing of frames on byte streams (WebTransport streams): each frame is preceded by its
//! length as a QUIC variable-length integer (RFC 9000 §16).
//!
//! Sans-IO: [`write_prefix`] produces the prefix; [`FrameSplitter`] takes bytes as they arrive
//! and hands out whole frames, telling "need more bytes" apart from "too large", and it never
//! reserves memory by a length it has not checked against the limit.

use bytes::{Buf, Bytes, BytesMut};

/// Largest value a QUIC varint can hold (2^62 − 1).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `value` as a QUIC varint in its shortest form. Values above [`VARINT_MAX`] are a
/// caller bug and are clamped.
pub fn write_varint(value: u64, out: &mut Vec<u8>) {
    let value = value.min(VARINT_MAX);
    if value < 1 << 6 {
        out.push(value as u8);
    } else if value < 1 << 14 {
        out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes());
    } else if value < 1 << 30 {
        out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Reads a QUIC varint from the start of `bytes`: `Some((value, length))`, or `None` if more
/// bytes are needed.
pub fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let raw = bytes.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for &b in &raw[1..] {
        value = (value << 8) | u64::from(b);
    }
    Some((value, len))
}

/// Appends the length prefix of a frame of `frame_len` bytes.
pub fn write_prefix(frame_len: usize, out: &mut Vec<u8>) {
    write_varint(frame_len as u64, out);
}

/// A prefix announced a frame larger than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the limit of {max}")]
pub struct TooLarge {
    /// Announced length.
    pub len: u64,
    /// The limit.
    pub max: usize,
}

/// Splits a byte stream into length-prefixed frames.
#[derive(Debug)]
pub struct FrameSplitter {
    buf: BytesMut,
    max_frame: usize,
}

impl FrameSplitter {
    /// A splitter refusing frames over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameSplitter {
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// The buffer to read more bytes into. It has room for what the pending frame still needs
    /// once its prefix is known (never more than the limit), else for `hint` bytes.
    pub fn buffer(&mut self, hint: usize) -> &mut BytesMut {
        let want = match read_varint(&self.buf) {
            Some((len, prefix)) if len <= self.max_frame as u64 => (prefix + len as usize)
                .saturating_sub(self.buf.len())
                .max(1),
            _ => hint,
        };
        self.buf.reserve(want.min(self.max_frame + 8));
        &mut self.buf
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, TooLarge> {
        let Some((len, prefix)) = read_varint(&self.buf) else {
            return Ok(None);
        };
        if len > self.max_frame as u64 {
            return Err(TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let end = prefix + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        self.buf.advance(prefix);
        let frame = self.buf.split_to(len as usize).freeze();
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            // Give back what a large frame left behind.
            self.buf = BytesMut::new();
        }
        Ok(Some(frame))
    }

    /// Bytes received but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc9000_varint_examples() {
        // RFC 9000 Appendix A.1.
        for (encoded, value) in [
            ("c2197c5eff14e88c", 151_288_809_941_952_652u64),
            ("9d7f3e7d", 494_878_333),
            ("7bbd", 15_293),
            ("25", 37),
        ] {
            let bytes = hex(encoded);
            assert_eq!(read_varint(&bytes), Some((value, bytes.len())));
            let mut out = Vec::new();
            write_varint(value, &mut out);
            assert_eq!(out, bytes, "{value}");
        }
        // The examples of docs/PROTOCOL.md §2b.
        let mut out = Vec::new();
        write_prefix(3, &mut out);
        write_prefix(300, &mut out);
        assert_eq!(out, [0x03, 0x41, 0x2c]);
        // A non-shortest encoding still reads.
        assert_eq!(read_varint(&hex("4025")), Some((37, 2)));
        assert_eq!(read_varint(&hex("7b")), None);
        assert_eq!(read_varint(&[]), None);
    }

    #[test]
    fn splits_frames_arriving_in_pieces() {
        let mut wire = Vec::new();
        for frame in [&b"a"[..], &[7u8; 100][..], &[9u8; 20_000][..]] {
            write_prefix(frame.len(), &mut wire);
            wire.extend_from_slice(frame);
        }
        let mut splitter = FrameSplitter::new(64 * 1024);
        let mut frames = Vec::new();
        for chunk in wire.chunks(7) {
            splitter.buffer(7).extend_from_slice(chunk);
            while let Some(frame) = splitter.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], b"a");
        assert_eq!(frames[1].len(), 100);
        assert_eq!(frames[2].len(), 20_000);
        assert_eq!(splitter.pending(), 0);
    }

    #[test]
    fn refuses_oversized_prefix_before_buffering() {
        let mut splitter = FrameSplitter::new(1024);
        let mut prefix = Vec::new();
        write_prefix(1025, &mut prefix);
        splitter.buffer(16).extend_from_slice(&prefix);
        assert_eq!(
            splitter.next_frame(),
            Err(TooLarge {
                len: 1025,
                max: 1024
            })
        );
        // A hostile 2^62 length reserves nothing large either.
        let mut splitter = FrameSplitter::new(1024);
        splitter.buffer(16).extend_from_slice(&[0xff; 8]);
        assert!(splitter.next_frame().is_err());
        assert!(splitter.buffer(16).capacity() < 4096);
    }
}
