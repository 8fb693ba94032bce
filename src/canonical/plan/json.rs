//! Rendering a resource as FHIR JSON straight from its Avro binary.

use super::{read::Input, shape, EventWriter, Node, Record};
use crate::canonical::avro::AvroShapeError;

/// A resource read straight into FHIR JSON (see [`EventWriter::read_json`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonResource {
    /// The resource as FHIR JSON, `resourceType` first: what serializing the resource
    /// [`EventWriter::read`] gives would write.
    pub json: String,
    /// Its `id` element.
    pub id: Option<String>,
}

impl EventWriter {
    /// The resource record at `node` onto `out` as the members of a JSON object, each with a
    /// leading comma (the caller writes the braces and `resourceType`), its `id` into `id`;
    /// false, with nothing written, when it is absent or empty.
    pub(super) fn write_json_resource(
        &self,
        node: usize,
        input: &mut Input<'_>,
        out: &mut Vec<u8>,
        id: &mut Option<String>,
    ) -> Result<bool, AvroShapeError> {
        match &self.nodes[node] {
            Node::Nullable { null, node, .. } => {
                if input.long()? == i64::from(*null) {
                    Ok(false)
                } else {
                    self.write_json_resource(*node, input, out, id)
                }
            }
            Node::Record(record) => {
                let start = out.len();
                // A member before: every member gets its comma.
                self.write_json_members(record, input, out, &mut true, Some(id))?;
                Ok(out.len() > start)
            }
            _ => Err(shape("resource", "a resource is a record")),
        }
    }

    /// The present fields of `record` onto `out` as JSON object members, each after a comma
    /// once `any` member came before (it says whether one did when done); the `id` field's
    /// value also into `id`, if given.
    fn write_json_members(
        &self,
        record: &Record,
        input: &mut Input<'_>,
        out: &mut Vec<u8>,
        any: &mut bool,
        mut id: Option<&mut Option<String>>,
    ) -> Result<(), AvroShapeError> {
        for (i, (_, field)) in record.fields.iter().enumerate() {
            let name = record.names[i];
            json_member(out, any, |out| {
                json_string(out, name);
                out.push(b':');
                match id
                    .as_deref_mut()
                    .filter(|_| name == crate::fhir::names().id)
                {
                    Some(id) => {
                        *id = self.read_text(*field, input, name)?;
                        Ok(id.as_deref().map(|id| json_string(out, id)).is_some())
                    }
                    None => self.write_json(*field, record.decimal[i], input, out),
                }
            })?;
        }
        Ok(())
    }

    /// The element at `node` onto `out` as FHIR JSON, as [`Self::read_element`] reads it and
    /// serializing the element writes it; false, with nothing written, when it is absent or
    /// empty.
    fn write_json(
        &self,
        node: usize,
        decimal: bool,
        input: &mut Input<'_>,
        out: &mut Vec<u8>,
    ) -> Result<bool, AvroShapeError> {
        Ok(match &self.nodes[node] {
            Node::Null => false,
            Node::Boolean => {
                out.extend_from_slice(if input.byte()? != 0 {
                    b"true"
                } else {
                    b"false"
                });
                true
            }
            Node::Int | Node::Long => {
                serde_json::to_writer(&mut *out, &input.long()?)
                    .expect("writing into memory cannot fail");
                true
            }
            Node::String if decimal => {
                let number: serde_json::Number = input
                    .text()?
                    .parse()
                    .map_err(|_| shape("", "a decimal field holds no decimal"))?;
                serde_json::to_writer(&mut *out, &number)
                    .map_err(|_| shape("", "a decimal field holds no decimal"))?;
                true
            }
            Node::String => {
                json_string(out, input.text()?);
                true
            }
            Node::Enum(_) | Node::TimestampMicros => match self.read_text(node, input, "")? {
                Some(text) => {
                    json_string(out, &text);
                    true
                }
                None => false,
            },
            Node::Array(items) => {
                input.enter()?;
                let start = out.len();
                out.push(b'[');
                let mut any = false;
                loop {
                    let count = input.block()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        json_member(out, &mut any, |out| {
                            self.write_json(*items, decimal, input, out)
                        })?;
                    }
                }
                input.leave();
                json_close(out, start, any, b']')
            }
            Node::Nullable { null, node, .. } => {
                if input.long()? == i64::from(*null) {
                    false
                } else {
                    self.write_json(*node, decimal, input, out)?
                }
            }
            Node::Record(record) => {
                input.enter()?;
                let start = out.len();
                out.push(b'{');
                let mut any = false;
                self.write_json_members(record, input, out, &mut any, None)?;
                input.leave();
                json_close(out, start, any, b'}')
            }
        })
    }
}

/// One member of a JSON array or object onto `out`, after a comma if `any` came before:
/// `write` writes it and says whether it is there; when it is not, nothing stays written.
fn json_member(
    out: &mut Vec<u8>,
    any: &mut bool,
    write: impl FnOnce(&mut Vec<u8>) -> Result<bool, AvroShapeError>,
) -> Result<(), AvroShapeError> {
    let mark = out.len();
    if *any {
        out.push(b',');
    }
    if write(out)? {
        *any = true;
    } else {
        out.truncate(mark);
    }
    Ok(())
}

/// Close the array or object opened at `start` with `close` if `any` member is in it, or
/// take it back (an empty one is absent in FHIR JSON); whether it stays.
fn json_close(out: &mut Vec<u8>, start: usize, any: bool, close: u8) -> bool {
    if any {
        out.push(close);
    } else {
        out.truncate(start);
    }
    any
}

/// `text` as a JSON string, escaped as serde_json escapes it.
pub(super) fn json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("writing into memory cannot fail");
}
