//! Data files of records besides JSON Lines: a `.json` array of objects and a `.parquet` table (the
//! form of Hugging Face datasets' shards). Each record's text field is one document, passed to the
//! same sink as a `.jsonl` line's.
//!
//! Bounded memory: a `.json` array is read one element at a time (each element whole, as a
//! `.jsonl` line up to `LINE_BYTES` is), and a Parquet table one row at a time from the one column
//! read; reading stops once the sink is full.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
use serde_json::Value as Json;

use super::data::{json_reason, object_text, send_conversation, Counted, DataError, Doc};
use crate::tokenizer::chat::Message;

/// Reads the objects of a JSON array from `reader`; element i (from 1) is reported as line i.
pub(crate) fn read_json_array(
    path: &Path,
    reader: impl std::io::Read,
    field: &str,
    sink: &mut Counted,
) -> Result<(), DataError> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut elements = Elements {
        path,
        field,
        sink,
        count: 0,
        stop: None,
    };
    let read = (&mut de).deserialize_seq(&mut elements);
    match (read, elements.stop.take()) {
        (_, Some(Stop::Failed(e))) => Err(e),
        (_, Some(Stop::Full)) => Ok(()),
        (Ok(()), None) => de.end().map_err(|e| bad_json(path, &e)),
        (Err(e), None) => Err(bad_json(path, &e)),
    }
}

fn bad_json(path: &Path, e: &serde_json::Error) -> DataError {
    DataError::BadJson {
        path: path.to_path_buf(),
        line: e.line(),
        reason: json_reason(e),
    }
}

/// Why the array's elements stopped being read before its end.
enum Stop {
    /// The sink holds enough.
    Full,
    /// An element is not a record with the text field.
    Failed(DataError),
}

/// Passes each element of the array to the sink as it is parsed.
struct Elements<'a, 'b> {
    path: &'a Path,
    field: &'a str,
    sink: &'a mut Counted<'b>,
    count: usize,
    stop: Option<Stop>,
}

impl<'de> Visitor<'de> for &mut Elements<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(value) = seq.next_element::<Json>()? {
            self.count += 1;
            if let Err(e) = object_text(self.path, self.count, value, self.field, self.sink) {
                self.stop = Some(Stop::Failed(e));
            } else if self.sink.sink.full() {
                self.stop = Some(Stop::Full);
            }
            if self.stop.is_some() {
                // Ends the parse; `read_json_array` reports why from `stop`.
                return Err(A::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

/// Reads column `field` of a Parquet table: each row's string is a document; a null is
/// skipped (a missing value, not a document).
pub(crate) fn read_parquet(
    path: &Path,
    file: File,
    field: &str,
    sink: &mut Counted,
) -> Result<(), DataError> {
    let fail = |reason: String| DataError::Parquet {
        path: path.to_path_buf(),
        reason,
    };
    // The reader is not hardened against malformed files: a panic inside it is a refusal.
    let reader = quietly(|| SerializedFileReader::new(file))
        .ok_or_else(|| fail("malformed Parquet file".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let columns = schema.root_schema().get_fields();
    let Some(column) = columns.iter().find(|c| c.name() == field) else {
        let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
        return Err(fail(format!(
            "no column `{field}` (columns: {}; choose one with --field)",
            names.join(", ")
        )));
    };
    let projection = Type::group_type_builder("schema")
        .with_fields(vec![column.clone()])
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| fail(e.to_string()))?;
    for row in 1.. {
        let next = quietly(|| rows.next()).ok_or_else(|| fail("malformed Parquet file".into()))?;
        let Some(next) = next else { break };
        let next = next.map_err(|e| fail(format!("row {row}: {e}")))?;
        let text = match next.get_column_iter().next().map(|(_, v)| v) {
            Some(Field::Str(s)) => s.as_bytes(),
            Some(Field::Bytes(b)) => b.data(),
            Some(Field::Null) | None => continue,
            Some(Field::ListInternal(turns)) => {
                conversation(turns.elements(), sink)
                    .map_err(|e| fail(format!("row {row}: {e}")))?;
                if sink.sink.full() {
                    break;
                }
                continue;
            }
            Some(other) => {
                return Err(fail(format!(
                    "row {row}: column `{field}` holds {}, not text",
                    kind(other)
                )))
            }
        };
        let mut doc = Doc::new(false);
        doc.feed(text, sink)?;
        doc.finish(sink)?;
        if sink.sink.full() {
            break;
        }
    }
    Ok(())
}

/// A list of `{role, content}` structs (a chat dataset's `messages` column) as one document.
fn conversation(turns: &[Field], sink: &mut Counted) -> Result<(), String> {
    let mut messages = Vec::with_capacity(turns.len());
    for turn in turns {
        let Field::Group(turn) = turn else {
            return Err("a list of turns must hold {role, content} records".into());
        };
        let text = |name: &str| {
            turn.get_column_iter()
                .find(|(n, _)| n.as_str() == name)
                .and_then(|(_, v)| match v {
                    Field::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .ok_or_else(|| format!("a turn has no text `{name}`"))
        };
        messages.push(Message {
            role: text("role")?,
            content: text("content")?,
        });
    }
    send_conversation(&messages, sink)
}

/// `f()`, or None when it panics, without the panic's message on stderr.
fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = catch_unwind(AssertUnwindSafe(f)).ok();
    std::panic::set_hook(hook);
    out
}

/// A Parquet value's kind, for a message.
fn kind(field: &Field) -> &'static str {
    match field {
        Field::Bool(_) => "booleans",
        Field::Group(_) => "records",
        Field::ListInternal(_) => "lists",
        Field::MapInternal(_) => "maps",
        _ => "numbers",
    }
}
