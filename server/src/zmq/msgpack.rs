//! A small borrowing MessagePack reader for the ZMQ decoder.
//!
//! Why not serde: the engines' payloads mix positional arrays and maps in one batch, type their
//! fields loosely (a hash is an int *or* `bin`, position 7 is a string *or* a map, the tail of a
//! `BlockStored` is recognised by type) and must be decoded event by event so that one bad event
//! does not lose its neighbours. A cursor that reads exactly what the decoder asks for does all
//! of that without building a value tree, and [`Reader::skip_value`] walks nested containers
//! with a counter instead of recursion, so hostile nesting cannot exhaust the stack.
//!
//! Every read is bounds-checked and returns [`MsgpackError`]; nothing here panics on input.

use rmp::Marker;

/// Why a MessagePack value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    /// The input ended inside a value.
    #[error("truncated msgpack at byte {0}")]
    Truncated(usize),
    /// The reserved marker `0xc1` (never valid msgpack).
    #[error("reserved msgpack marker 0xc1 at byte {0}")]
    Reserved(usize),
    /// A value of another type than the one the decoder needs.
    #[error("expected {expected}, found {found} at byte {at}")]
    Type {
        /// The type the decoder needed.
        expected: &'static str,
        /// The type it found.
        found: &'static str,
        /// Byte offset of the value.
        at: usize,
    },
    /// A msgpack `str` whose bytes are not UTF-8.
    #[error("msgpack string is not UTF-8 at byte {0}")]
    Utf8(usize),
}

/// The type family of the next value, as far as the decoder cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
}

impl Kind {
    /// Lower-case name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nil => "nil",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "str",
            Kind::Bin => "bin",
            Kind::Array => "array",
            Kind::Map => "map",
            Kind::Ext => "ext",
        }
    }
}

fn kind_of(marker: Marker) -> Option<Kind> {
    Some(match marker {
        Marker::Null => Kind::Nil,
        Marker::True | Marker::False => Kind::Bool,
        Marker::FixPos(_)
        | Marker::FixNeg(_)
        | Marker::U8
        | Marker::U16
        | Marker::U32
        | Marker::U64
        | Marker::I8
        | Marker::I16
        | Marker::I32
        | Marker::I64 => Kind::Int,
        Marker::F32 | Marker::F64 => Kind::Float,
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => Kind::Str,
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => Kind::Bin,
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => Kind::Array,
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => Kind::Map,
        Marker::FixExt1
        | Marker::FixExt2
        | Marker::FixExt4
        | Marker::FixExt8
        | Marker::FixExt16
        | Marker::Ext8
        | Marker::Ext16
        | Marker::Ext32 => Kind::Ext,
        Marker::Reserved => return None,
    })
}

/// A cursor over one msgpack buffer.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Result<T> = std::result::Result<T, MsgpackError>;

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Byte offset of the next value.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(MsgpackError::Truncated(self.pos))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u8(&mut self) -> Result<usize> {
        Ok(usize::from(self.byte()?))
    }

    fn len_u16(&mut self) -> Result<usize> {
        Ok(usize::from(u16::from_be_bytes(self.be()?)))
    }

    fn len_u32(&mut self) -> Result<usize> {
        // u32 always fits in usize on the 32/64-bit targets we build for.
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn peek_marker(&self) -> Result<Marker> {
        self.buf
            .get(self.pos)
            .map(|&b| Marker::from_u8(b))
            .ok_or(MsgpackError::Truncated(self.pos))
    }

    /// The type of the next value, without consuming it.
    pub fn peek_kind(&self) -> Result<Kind> {
        kind_of(self.peek_marker()?).ok_or(MsgpackError::Reserved(self.pos))
    }

    fn type_error(&self, expected: &'static str) -> MsgpackError {
        let found = self.peek_kind().map(Kind::name).unwrap_or("nothing");
        MsgpackError::Type {
            expected,
            found,
            at: self.pos,
        }
    }

    /// Consume a nil if the next value is nil; `Ok(false)` (nothing consumed) otherwise.
    pub fn try_nil(&mut self) -> Result<bool> {
        if self.peek_marker()? == Marker::Null {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Read an integer of any width and sign, widened to i128 so both `i64` and `u64` fit.
    pub fn read_int(&mut self) -> Result<i128> {
        let marker = self.peek_marker()?;
        let v = match marker {
            Marker::FixPos(v) => {
                self.pos += 1;
                i128::from(v)
            }
            Marker::FixNeg(v) => {
                self.pos += 1;
                i128::from(v)
            }
            Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => {
                self.pos += 1;
                match marker {
                    Marker::U8 => i128::from(self.byte()?),
                    Marker::U16 => i128::from(u16::from_be_bytes(self.be()?)),
                    Marker::U32 => i128::from(u32::from_be_bytes(self.be()?)),
                    _ => i128::from(u64::from_be_bytes(self.be()?)),
                }
            }
            Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
                self.pos += 1;
                match marker {
                    Marker::I8 => i128::from(i8::from_be_bytes(self.be()?)),
                    Marker::I16 => i128::from(i16::from_be_bytes(self.be()?)),
                    Marker::I32 => i128::from(i32::from_be_bytes(self.be()?)),
                    _ => i128::from(i64::from_be_bytes(self.be()?)),
                }
            }
            _ => return Err(self.type_error("int")),
        };
        Ok(v)
    }

    /// Read an int or a float as f64 (used for the batch timestamp).
    pub fn read_number(&mut self) -> Result<f64> {
        match self.peek_marker()? {
            Marker::F32 => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.be()?)))
            }
            Marker::F64 => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            _ => {
                let at = self.pos;
                self.read_int()
                    .map(|v| v as f64)
                    .map_err(|_| MsgpackError::Type {
                        expected: "number",
                        found: self.peek_kind().map(Kind::name).unwrap_or("nothing"),
                        at,
                    })
            }
        }
    }

    /// Read the raw bytes of a msgpack `str` (not checked for UTF-8).
    pub fn read_str_bytes(&mut self) -> Result<&'a [u8]> {
        let len = match self.peek_marker()? {
            Marker::FixStr(n) => {
                self.pos += 1;
                usize::from(n)
            }
            Marker::Str8 => {
                self.pos += 1;
                self.len_u8()?
            }
            Marker::Str16 => {
                self.pos += 1;
                self.len_u16()?
            }
            Marker::Str32 => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => return Err(self.type_error("str")),
        };
        self.take(len)
    }

    /// Read a msgpack `str` as UTF-8 text.
    pub fn read_str(&mut self) -> Result<&'a str> {
        let at = self.pos;
        let bytes = self.read_str_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| MsgpackError::Utf8(at))
    }

    /// Read a msgpack `bin`.
    pub fn read_bin(&mut self) -> Result<&'a [u8]> {
        let len = match self.peek_marker()? {
            Marker::Bin8 => {
                self.pos += 1;
                self.len_u8()?
            }
            Marker::Bin16 => {
                self.pos += 1;
                self.len_u16()?
            }
            Marker::Bin32 => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => return Err(self.type_error("bin")),
        };
        self.take(len)
    }

    /// Read an array header; the caller then reads (or skips) that many values.
    pub fn read_array_len(&mut self) -> Result<usize> {
        match self.peek_marker()? {
            Marker::FixArray(n) => {
                self.pos += 1;
                Ok(usize::from(n))
            }
            Marker::Array16 => {
                self.pos += 1;
                self.len_u16()
            }
            Marker::Array32 => {
                self.pos += 1;
                self.len_u32()
            }
            _ => Err(self.type_error("array")),
        }
    }

    /// Read a map header; the caller then reads (or skips) that many key/value pairs.
    pub fn read_map_len(&mut self) -> Result<usize> {
        match self.peek_marker()? {
            Marker::FixMap(n) => {
                self.pos += 1;
                Ok(usize::from(n))
            }
            Marker::Map16 => {
                self.pos += 1;
                self.len_u16()
            }
            Marker::Map32 => {
                self.pos += 1;
                self.len_u32()
            }
            _ => Err(self.type_error("map")),
        }
    }

    /// Skip one complete value (containers included) without recursion.
    ///
    /// Every value consumes at least one byte, so a hostile header announcing 2^32 elements
    /// fails with `Truncated` after at most `remaining input` steps.
    pub fn skip_value(&mut self) -> Result<()> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let marker = self.peek_marker()?;
            let at = self.pos;
            self.pos += 1;
            match marker {
                Marker::Null
                | Marker::True
                | Marker::False
                | Marker::FixPos(_)
                | Marker::FixNeg(_) => {}
                Marker::U8 | Marker::I8 => {
                    self.take(1)?;
                }
                Marker::U16 | Marker::I16 => {
                    self.take(2)?;
                }
                Marker::U32 | Marker::I32 | Marker::F32 => {
                    self.take(4)?;
                }
                Marker::U64 | Marker::I64 | Marker::F64 => {
                    self.take(8)?;
                }
                Marker::FixStr(n) => {
                    self.take(usize::from(n))?;
                }
                Marker::Str8 | Marker::Bin8 => {
                    let n = self.len_u8()?;
                    self.take(n)?;
                }
                Marker::Str16 | Marker::Bin16 => {
                    let n = self.len_u16()?;
                    self.take(n)?;
                }
                Marker::Str32 | Marker::Bin32 => {
                    let n = self.len_u32()?;
                    self.take(n)?;
                }
                Marker::FixArray(n) => pending += u64::from(n),
                Marker::Array16 => pending += self.len_u16()? as u64,
                Marker::Array32 => pending += self.len_u32()? as u64,
                Marker::FixMap(n) => pending += 2 * u64::from(n),
                Marker::Map16 => pending += 2 * self.len_u16()? as u64,
                Marker::Map32 => pending += 2 * self.len_u32()? as u64,
                Marker::FixExt1 => {
                    self.take(2)?;
                }
                Marker::FixExt2 => {
                    self.take(3)?;
                }
                Marker::FixExt4 => {
                    self.take(5)?;
                }
                Marker::FixExt8 => {
                    self.take(9)?;
                }
                Marker::FixExt16 => {
                    self.take(17)?;
                }
                Marker::Ext8 => {
                    let n = self.len_u8()?;
                    self.take(n + 1)?;
                }
                Marker::Ext16 => {
                    let n = self.len_u16()?;
                    self.take(n + 1)?;
                }
                Marker::Ext32 => {
                    let n = self.len_u32()?;
                    self.take(n.saturating_add(1))?;
                }
                Marker::Reserved => return Err(MsgpackError::Reserved(at)),
            }
        }
        Ok(())
    }

    /// Skip one value and return its raw bytes (to decode it again in isolation).
    pub fn value_slice(&mut self) -> Result<&'a [u8]> {
        let start = self.pos;
        self.skip_value()?;
        Ok(&self.buf[start..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn ints_of_every_width_and_sign() {
        let cases: Vec<(Vec<u8>, i128)> = vec![
            (enc(|b| rmp::encode::write_pfix(b, 7).unwrap()), 7),
            (enc(|b| rmp::encode::write_nfix(b, -3).unwrap()), -3),
            (enc(|b| rmp::encode::write_u8(b, 200).unwrap()), 200),
            (enc(|b| rmp::encode::write_u16(b, 60000).unwrap()), 60000),
            (
                enc(|b| rmp::encode::write_u32(b, 4_000_000_000).unwrap()),
                4_000_000_000,
            ),
            (
                enc(|b| rmp::encode::write_u64(b, u64::MAX).unwrap()),
                i128::from(u64::MAX),
            ),
            (enc(|b| rmp::encode::write_i8(b, -100).unwrap()), -100),
            (enc(|b| rmp::encode::write_i16(b, -30000).unwrap()), -30000),
            (
                enc(|b| rmp::encode::write_i32(b, -2_000_000_000).unwrap()),
                -2_000_000_000,
            ),
            (
                enc(|b| rmp::encode::write_i64(b, i64::MIN).unwrap()),
                i128::from(i64::MIN),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Reader::new(&bytes).read_int().unwrap(), want, "{bytes:?}");
        }
    }

    #[test]
    fn skip_nested_and_report_truncation() {
        let bytes = enc(|b| {
            rmp::encode::write_array_len(b, 3).unwrap();
            rmp::encode::write_map_len(b, 1).unwrap();
            rmp::encode::write_str(b, "k").unwrap();
            rmp::encode::write_array_len(b, 2).unwrap();
            rmp::encode::write_bin(b, &[1, 2, 3]).unwrap();
            rmp::encode::write_f64(b, 1.5).unwrap();
            rmp::encode::write_nil(b).unwrap();
            rmp::encode::write_ext_meta(b, 2, 5).unwrap();
            b.extend_from_slice(&[9, 9]);
            rmp::encode::write_u8(b, 1).unwrap();
        });
        let mut r = Reader::new(&bytes);
        r.skip_value().unwrap();
        let first_len = r.position();
        assert_eq!(r.read_int().unwrap(), 1);
        for cut in 0..first_len {
            assert!(
                Reader::new(&bytes[..cut]).skip_value().is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        let mut bytes = vec![0x91u8; 1_000_000]; // 1M nested fixarrays of one element
        bytes.push(0xc0);
        let mut r = Reader::new(&bytes);
        r.skip_value().unwrap();
        assert_eq!(r.position(), bytes.len());
    }

    #[test]
    fn type_errors_name_what_was_found() {
        let bytes = enc(|b| rmp::encode::write_str(b, "x").unwrap());
        let err = Reader::new(&bytes).read_int().unwrap_err();
        assert_eq!(
            err,
            MsgpackError::Type {
                expected: "int",
                found: "str",
                at: 0
            }
        );
        assert_eq!(
            Reader::new(&[0xc1]).skip_value(),
            Err(MsgpackError::Reserved(0))
        );
        assert_eq!(
            Reader::new(&[0xa2, 0xff, 0xfe]).read_str(),
            Err(MsgpackError::Utf8(0))
        );
    }
}
