//! A streaming scanner for one `.jsonl` line too long to parse whole (over
//! [`super::data::LINE_BYTES`]): it checks the JSON syntax as bytes arrive, with a stack of open
//! containers, and passes the text field of the top-level object on to the document as it is
//! decoded, so a 200 MB line costs the memory of one read, not of the line (issue 18).
//!
//! It refuses what serde_json refuses on a short line, with its own wording for syntax errors
//! ("expected value at column N", ...) and the same errors for a line that is not an object, a
//! missing field or a field that is not a string. Two differences, both on pathological lines: a
//! key given twice takes its first value (serde_json's map keeps the last), and when the reader
//! stops at its token limit the rest of the line is not read, so its syntax is not checked.

use std::path::Path;

use super::data::{Counted, DataError, Doc};

/// serde_json's default nesting limit.
const MAX_DEPTH: usize = 128;

#[derive(Clone, Copy, PartialEq)]
enum Container {
    Object,
    Array,
}

#[derive(Clone, Copy, PartialEq)]
enum Escape {
    None,
    Backslash,
    /// `\u` and the hex digits read so far.
    Hex(u8, u32),
}

#[derive(Clone, Copy, PartialEq)]
enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Number {
    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(
            self,
            Number::Zero | Number::Int | Number::Frac | Number::ExpDigits
        )
    }
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// Before the top-level value.
    Start,
    /// A value must come (after `:`, or `,` in an array).
    Value,
    /// After `[`.
    ValueOrClose,
    /// After `{`.
    KeyOrClose,
    /// After `,` in an object.
    Key,
    Colon,
    CommaOrClose,
    /// After the top-level value: only whitespace may follow.
    End,
    Str {
        key: bool,
        escape: Escape,
    },
    Literal {
        word: &'static [u8],
        at: usize,
    },
    Num(Number),
}

/// The scanner of one line.
pub(crate) struct Scan<'a> {
    path: &'a Path,
    line: usize,
    field: &'a [u8],
    /// Bytes of the line seen so far.
    column: usize,
    stack: Vec<Container>,
    state: State,
    /// Bytes of a top-level key that match `field` so far; None once it differs or when the key
    /// is not a top-level one.
    key: Option<usize>,
    /// The next value is the text field.
    field_next: bool,
    /// The text field's string is being decoded into `doc`.
    in_field: bool,
    doc: Option<Doc>,
    /// A `\u` high surrogate waiting for its low half.
    high: Option<u32>,
    /// Decoded text not yet passed to `doc`.
    out: Vec<u8>,
    /// The start of a UTF-8 character split across two reads.
    carry: Vec<u8>,
    invalid_utf8: bool,
}

impl<'a> Scan<'a> {
    pub(crate) fn new(path: &'a Path, line: usize, field: &'a str) -> Scan<'a> {
        Scan {
            path,
            line,
            field: field.as_bytes(),
            column: 0,
            stack: Vec::new(),
            state: State::Start,
            key: None,
            field_next: false,
            in_field: false,
            doc: None,
            high: None,
            out: Vec::new(),
            carry: Vec::new(),
            invalid_utf8: false,
        }
    }

    fn bad(&self, what: &str) -> DataError {
        DataError::BadJson {
            path: self.path.to_path_buf(),
            line: self.line,
            reason: format!("{what} at column {}", self.column),
        }
    }

    /// The next bytes of the line.
    pub(crate) fn feed(&mut self, bytes: &[u8], sink: &mut Counted) -> Result<(), DataError> {
        if self.invalid_utf8 {
            return Ok(());
        }
        if !self.utf8_ok(bytes) {
            // The line is skipped and counted, as a short one would be.
            self.invalid_utf8 = true;
            if let Some(doc) = &mut self.doc {
                doc.reject(sink);
            }
            return Ok(());
        }
        for &b in bytes {
            self.column += 1;
            self.byte(b, sink)?;
        }
        self.flush(sink)
    }

    /// Whether `bytes` continue valid UTF-8 (a character may straddle two reads).
    fn utf8_ok(&mut self, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        while !self.carry.is_empty() && !rest.is_empty() {
            self.carry.push(rest[0]);
            rest = &rest[1..];
            match std::str::from_utf8(&self.carry) {
                Ok(_) => self.carry.clear(),
                Err(e) if e.error_len().is_some() => return false,
                Err(_) => {}
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                self.carry.extend_from_slice(&rest[e.valid_up_to()..]);
                true
            }
            Err(_) => false,
        }
    }

    fn flush(&mut self, sink: &mut Counted) -> Result<(), DataError> {
        if let Some(doc) = &mut self.doc {
            if !self.out.is_empty() {
                doc.feed(&self.out, sink)?;
            }
        }
        self.out.clear();
        Ok(())
    }

    fn byte(&mut self, b: u8, sink: &mut Counted) -> Result<(), DataError> {
        match self.state {
            State::Str { key, escape } => self.string(b, key, escape),
            State::Literal { word, at } => {
                if word.get(at) != Some(&b) {
                    return Err(self.bad("expected ident"));
                }
                self.state = if at + 1 == word.len() {
                    self.value_done()
                } else {
                    State::Literal { word, at: at + 1 }
                };
                Ok(())
            }
            State::Num(n) => match self.number(n, b) {
                Some(next) => {
                    self.state = State::Num(next);
                    Ok(())
                }
                None if n.complete() => {
                    self.state = self.value_done();
                    self.byte(b, sink)
                }
                None => Err(self.bad("invalid number")),
            },
            _ if matches!(b, b' ' | b'\t' | b'\r' | b'\n') => Ok(()),
            State::Start => {
                if b != b'{' {
                    return Err(DataError::NotAnObject {
                        path: self.path.to_path_buf(),
                        line: self.line,
                        found: match b {
                            b'[' => "an array",
                            b'"' => "a string",
                            b't' | b'f' => "a boolean",
                            b'n' => "null",
                            b'-' | b'0'..=b'9' => "a number",
                            _ => return Err(self.bad("expected value")),
                        },
                    });
                }
                self.open(Container::Object)
            }
            State::Value => self.value(b, sink),
            State::ValueOrClose if b == b']' => self.close(),
            State::ValueOrClose => self.value(b, sink),
            State::KeyOrClose if b == b'}' => self.close(),
            State::KeyOrClose | State::Key if b == b'"' => {
                self.key = (self.stack.len() == 1).then_some(0);
                self.state = State::Str {
                    key: true,
                    escape: Escape::None,
                };
                Ok(())
            }
            State::KeyOrClose | State::Key => Err(self.bad("key must be a string")),
            State::Colon if b == b':' => {
                self.state = State::Value;
                Ok(())
            }
            State::Colon => Err(self.bad("expected `:`")),
            State::CommaOrClose => match (b, self.stack.last()) {
                (b',', Some(Container::Object)) => {
                    self.state = State::Key;
                    Ok(())
                }
                (b',', _) => {
                    self.state = State::Value;
                    Ok(())
                }
                (b'}', Some(Container::Object)) | (b']', Some(Container::Array)) => self.close(),
                (_, Some(Container::Object)) => Err(self.bad("expected `,` or `}`")),
                _ => Err(self.bad("expected `,` or `]`")),
            },
            State::End => Err(self.bad("trailing characters")),
        }
    }

    fn open(&mut self, c: Container) -> Result<(), DataError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.bad("recursion limit exceeded"));
        }
        self.stack.push(c);
        self.state = match c {
            Container::Object => State::KeyOrClose,
            Container::Array => State::ValueOrClose,
        };
        Ok(())
    }

    fn close(&mut self) -> Result<(), DataError> {
        self.stack.pop();
        self.state = self.value_done();
        Ok(())
    }

    /// The state after a complete value.
    fn value_done(&self) -> State {
        if self.stack.is_empty() {
            State::End
        } else {
            State::CommaOrClose
        }
    }

    fn value(&mut self, b: u8, sink: &mut Counted) -> Result<(), DataError> {
        let field = std::mem::take(&mut self.field_next);
        if field && b != b'"' {
            return Err(DataError::NotAString {
                path: self.path.to_path_buf(),
                line: self.line,
                field: String::from_utf8_lossy(self.field).into_owned(),
                found: match b {
                    b'{' => "an object",
                    b'[' => "an array",
                    b't' | b'f' => "a boolean",
                    b'n' => "null",
                    b'-' | b'0'..=b'9' => "a number",
                    _ => return Err(self.bad("expected value")),
                },
            });
        }
        match b {
            b'{' => self.open(Container::Object),
            b'[' => self.open(Container::Array),
            b'"' => {
                if field {
                    self.flush(sink)?;
                    self.in_field = true;
                    self.doc = Some(Doc::new(false));
                }
                self.state = State::Str {
                    key: false,
                    escape: Escape::None,
                };
                Ok(())
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' => {
                self.state = State::Num(Number::Minus);
                Ok(())
            }
            b'0' => {
                self.state = State::Num(Number::Zero);
                Ok(())
            }
            b'1'..=b'9' => {
                self.state = State::Num(Number::Int);
                Ok(())
            }
            _ => Err(self.bad("expected value")),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), DataError> {
        self.state = State::Literal { word, at: 1 };
        Ok(())
    }

    /// The number state after `b`, or None when `b` does not continue the number.
    fn number(&self, n: Number, b: u8) -> Option<Number> {
        let digit = b.is_ascii_digit();
        Some(match (n, b) {
            (Number::Minus, b'0') => Number::Zero,
            (Number::Minus, _) if digit => Number::Int,
            (Number::Int, _) if digit => Number::Int,
            (Number::Zero | Number::Int, b'.') => Number::Dot,
            (Number::Dot | Number::Frac, _) if digit => Number::Frac,
            (Number::Zero | Number::Int | Number::Frac, b'e' | b'E') => Number::Exp,
            (Number::Exp, b'+' | b'-') => Number::ExpSign,
            (Number::Exp | Number::ExpSign | Number::ExpDigits, _) if digit => Number::ExpDigits,
            _ => return None,
        })
    }

    /// One byte inside a string.
    fn string(&mut self, b: u8, key: bool, escape: Escape) -> Result<(), DataError> {
        let set = |s: &mut Scan, escape| {
            s.state = State::Str { key, escape };
        };
        match escape {
            Escape::None => match b {
                b'"' => {
                    if self.high.is_some() {
                        return Err(self.bad("lone leading surrogate in hex escape"));
                    }
                    self.string_done(key);
                }
                b'\\' => set(self, Escape::Backslash),
                0..=0x1f => {
                    return Err(self
                        .bad("control character (\\u0000-\\u001F) found while parsing a string"))
                }
                _ => self.decoded(&[b], key)?,
            },
            Escape::Backslash => {
                let c = match b {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'/' => b'/',
                    b'b' => 8,
                    b'f' => 12,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        set(self, Escape::Hex(0, 0));
                        return Ok(());
                    }
                    _ => return Err(self.bad("invalid escape")),
                };
                set(self, Escape::None);
                self.decoded(&[c], key)?;
            }
            Escape::Hex(n, acc) => {
                let digit = (b as char)
                    .to_digit(16)
                    .ok_or_else(|| self.bad("invalid escape"))?;
                let acc = acc * 16 + digit;
                if n < 3 {
                    set(self, Escape::Hex(n + 1, acc));
                } else {
                    set(self, Escape::None);
                    self.code_unit(acc, key)?;
                }
            }
        }
        Ok(())
    }

    /// A `\uXXXX` escape: a character, or half of a surrogate pair.
    fn code_unit(&mut self, unit: u32, key: bool) -> Result<(), DataError> {
        let c = match (self.high.take(), unit) {
            (None, 0xD800..=0xDBFF) => {
                self.high = Some(unit);
                return Ok(());
            }
            (Some(high), 0xDC00..=0xDFFF) => {
                char::from_u32(0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00))
            }
            (None, _) => char::from_u32(unit),
            (Some(_), _) => None,
        }
        .ok_or_else(|| self.bad("lone leading surrogate in hex escape"))?;
        let mut buf = [0u8; 4];
        self.decoded(c.encode_utf8(&mut buf).as_bytes(), key)
    }

    /// Decoded string bytes: compared with the field name in a top-level key, kept for the
    /// document in the text field, dropped elsewhere.
    fn decoded(&mut self, bytes: &[u8], key: bool) -> Result<(), DataError> {
        if self.high.is_some() {
            return Err(self.bad("lone leading surrogate in hex escape"));
        }
        if key {
            self.key = self.key.and_then(|at| {
                (self.field.get(at..at + bytes.len()) == Some(bytes)).then_some(at + bytes.len())
            });
        } else if self.in_field {
            self.out.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn string_done(&mut self, key: bool) {
        if key {
            // The first occurrence of the field is the text (see the header).
            self.field_next = self.key == Some(self.field.len()) && self.doc.is_none();
            self.key = None;
            self.state = State::Colon;
        } else {
            self.in_field = false;
            self.state = self.value_done();
        }
    }

    /// The end of the line: the value must be complete and the field found.
    pub(crate) fn finish(mut self, sink: &mut Counted) -> Result<(), DataError> {
        if self.invalid_utf8 || !self.carry.is_empty() {
            match self.doc.take() {
                Some(mut doc) => {
                    doc.reject(sink);
                    doc.finish(sink)?;
                }
                None => sink.skipped += 1,
            }
            return Ok(());
        }
        if let State::Num(n) = self.state {
            if n.complete() {
                self.state = self.value_done();
            }
        }
        match self.state {
            State::Start => return Ok(()),
            State::End => {}
            State::Str { .. } => return Err(self.bad("EOF while parsing a string")),
            _ if self.stack.first() == Some(&Container::Object) => {
                return Err(self.bad("EOF while parsing an object"))
            }
            _ => return Err(self.bad("EOF while parsing a value")),
        }
        self.flush(sink)?;
        match self.doc.take() {
            Some(doc) => doc.finish(sink),
            None => Err(DataError::MissingField {
                path: self.path.to_path_buf(),
                line: self.line,
                field: String::from_utf8_lossy(self.field).into_owned(),
            }),
        }
    }
}
