//! Writing an event into Avro binary along the plan.

use chrono::{DateTime, Utc};
use smallvec::SmallVec;

use super::{shape, EventWriter, Field, Node, Record};
use crate::{
    canonical::{avro::AvroShapeError, CanonicalEvent, KeyColumn, Provenance},
    fhir::Element,
};

impl EventWriter {
    /// The Avro body of `event`, appended to `out`.
    pub fn write(&self, event: &CanonicalEvent, out: &mut Vec<u8>) -> Result<(), AvroShapeError> {
        let Node::Record(record) = &self.nodes[self.root] else {
            unreachable!("event schemas are records")
        };
        for ((name, node), field) in record.fields.iter().zip(&self.envelope) {
            let node = *node;
            match field {
                Some(Field::EventId) => self.write_str(node, &event.event_id, out, name)?,
                Some(Field::ResourceType) => {
                    self.write_str(node, &event.resource_type, out, name)?
                }
                Some(Field::ResourceId) => self.write_str(node, &event.resource_id, out, name)?,
                Some(Field::ResourceVersion) => {
                    self.write_str(node, &event.resource_version, out, name)?
                }
                Some(Field::Op) => self.write_str(node, event.op.name(), out, name)?,
                Some(Field::Domain) => self.write_str(node, &event.domain, out, name)?,
                Some(Field::Sensitivity) => {
                    self.write_str(node, event.sensitivity.as_str(), out, name)?
                }
                Some(Field::Resource) => {
                    self.write_element(node, event.resource.as_ref(), out, name)?
                }
                Some(Field::Provenance) => self.write_provenance(node, &event.provenance, out)?,
                _ => return Err(shape(name, "a field this writer does not know")),
            }
        }
        Ok(())
    }

    fn write_provenance(
        &self,
        node: usize,
        p: &Provenance,
        out: &mut Vec<u8>,
    ) -> Result<(), AvroShapeError> {
        let Node::Record(record) = &self.nodes[node] else {
            return Err(shape("provenance", "expected a record"));
        };
        for ((name, node), field) in record.fields.iter().zip(&self.provenance) {
            let node = *node;
            match field {
                Some(Field::SourceSystem) => self.write_str(node, &p.source_system, out, name)?,
                Some(Field::Connector) => self.write_str(node, &p.connector, out, name)?,
                Some(Field::DatabaseKind) => self.write_str(node, &p.database_kind, out, name)?,
                Some(Field::Database) => self.write_str(node, &p.database, out, name)?,
                Some(Field::Schema) => self.write_str(node, &p.schema, out, name)?,
                Some(Field::Table) => self.write_str(node, &p.table, out, name)?,
                Some(Field::PrimaryKey) => self.write_primary_key(node, &p.primary_key, out)?,
                Some(Field::SourcePosition) => {
                    self.write_str(node, &p.source_position, out, name)?
                }
                Some(Field::TransactionId) => {
                    self.write_optional_str(node, p.transaction_id.as_deref(), out, name)?
                }
                Some(Field::CommitTime) => self.write_time(node, p.commit_time, out, name)?,
                Some(Field::CaptureTime) => {
                    self.write_time(node, Some(p.capture_time), out, name)?
                }
                Some(Field::MappingId) => self.write_str(node, &p.mapping_id, out, name)?,
                Some(Field::MappingVersion) => {
                    self.write_str(node, &p.mapping_version, out, name)?
                }
                Some(Field::Snapshot) => match self.nodes[node] {
                    Node::Boolean => out.push(u8::from(p.snapshot)),
                    _ => return Err(shape(name, "expected a boolean")),
                },
                _ => return Err(shape(name, "a field this writer does not know")),
            }
        }
        Ok(())
    }

    fn write_time(
        &self,
        node: usize,
        time: Option<DateTime<Utc>>,
        out: &mut Vec<u8>,
        path: &str,
    ) -> Result<(), AvroShapeError> {
        match (time, &self.nodes[node]) {
            (Some(time), Node::TimestampMicros) => varint(time.timestamp_micros(), out),
            (Some(time), Node::Nullable { value, node, .. }) => {
                varint(i64::from(*value), out);
                self.write_time(*node, Some(time), out, path)?;
            }
            (None, Node::Nullable { null, .. }) => varint(i64::from(*null), out),
            (None, _) => return Err(shape(path, "a required field is missing")),
            (Some(_), _) => return Err(shape(path, "expected a timestamp")),
        }
        Ok(())
    }

    fn write_optional_str(
        &self,
        node: usize,
        s: Option<&str>,
        out: &mut Vec<u8>,
        path: &str,
    ) -> Result<(), AvroShapeError> {
        match (s, &self.nodes[node]) {
            (None, Node::Nullable { null, .. }) => {
                varint(i64::from(*null), out);
                Ok(())
            }
            (Some(s), _) => self.write_str(node, s, out, path),
            (None, _) => Err(shape(path, "a required field is missing")),
        }
    }

    /// A text value into a string, enum or nullable of those.
    fn write_str(
        &self,
        node: usize,
        s: &str,
        out: &mut Vec<u8>,
        path: &str,
    ) -> Result<(), AvroShapeError> {
        match &self.nodes[node] {
            Node::String => string(s, out),
            Node::Enum(symbols) => {
                let index = symbols
                    .iter()
                    .position(|sym| sym == s)
                    .ok_or_else(|| shape(path, "not a symbol of the enum"))?;
                varint(index as i64, out);
            }
            Node::Nullable { value, node, .. } => {
                varint(i64::from(*value), out);
                self.write_str(*node, s, out, path)?;
            }
            _ => return Err(shape(path, "expected text")),
        }
        Ok(())
    }

    fn write_primary_key(
        &self,
        node: usize,
        key: &[KeyColumn],
        out: &mut Vec<u8>,
    ) -> Result<(), AvroShapeError> {
        let path = "primary_key";
        let Node::Array(item) = self.nodes[node] else {
            return Err(shape(path, "expected an array"));
        };
        let Node::Record(record) = &self.nodes[item] else {
            return Err(shape(path, "expected an array of records"));
        };
        let fields = &record.fields;
        if !key.is_empty() {
            varint(key.len() as i64, out);
            for column in key {
                for (name, node) in fields {
                    match name.as_str() {
                        "column" => self.write_str(*node, &column.column, out, name)?,
                        "value" => {
                            self.write_optional_str(*node, column.value.as_deref(), out, name)?
                        }
                        other => return Err(shape(other, "a field this writer does not know")),
                    }
                }
            }
        }
        out.push(0);
        Ok(())
    }

    /// A resource element, or its absence, into the schema node generated for it.
    fn write_element(
        &self,
        node: usize,
        element: Option<&Element>,
        out: &mut Vec<u8>,
        path: &str,
    ) -> Result<(), AvroShapeError> {
        match &self.nodes[node] {
            Node::Null => {}
            Node::Boolean => match element {
                Some(Element::Boolean(b)) => out.push(u8::from(*b)),
                _ => return Err(shape(path, "expected a boolean")),
            },
            Node::Int => {
                let i = match element {
                    Some(Element::Number(n)) => n.as_i64().and_then(|i| i32::try_from(i).ok()),
                    _ => None,
                };
                varint(
                    i64::from(i.ok_or_else(|| shape(path, "expected a 32-bit integer"))?),
                    out,
                );
            }
            Node::Long => match element {
                Some(Element::Number(n)) => varint(
                    n.as_i64()
                        .ok_or_else(|| shape(path, "expected an integer"))?,
                    out,
                ),
                _ => return Err(shape(path, "expected an integer")),
            },
            Node::TimestampMicros => return Err(shape(path, "a timestamp in a resource")),
            Node::String | Node::Enum(_) => match element {
                // A FHIR decimal: its exact digits.
                Some(Element::Number(number)) if matches!(self.nodes[node], Node::String) => {
                    string(number.as_str(), out)
                }
                Some(text @ (Element::String(_) | Element::Shared(_))) => {
                    self.write_str(node, text.as_str().unwrap_or_default(), out, path)?
                }
                _ => return Err(shape(path, "expected text")),
            },
            Node::Array(items) => match element {
                None => out.push(0),
                Some(Element::Array(values)) if values.is_empty() => out.push(0),
                Some(Element::Array(values)) => {
                    varint(values.len() as i64, out);
                    for value in values {
                        self.write_element(*items, Some(value), out, path)?;
                    }
                    out.push(0);
                }
                Some(_) => return Err(shape(path, "expected an array")),
            },
            Node::Nullable { null, value, node } => match element {
                None => varint(i64::from(*null), out),
                Some(_) => {
                    varint(i64::from(*value), out);
                    self.write_element(*node, element, out, path)?;
                }
            },
            Node::Record(record) => self.write_record(record, element, out, path)?,
        }
        Ok(())
    }

    /// An object into its record. Kept out of [`Self::write_element`], which every leaf
    /// goes through, so that a leaf's call does not set up this one's large frame.
    #[inline(never)]
    fn write_record(
        &self,
        record: &Record,
        element: Option<&Element>,
        out: &mut Vec<u8>,
        path: &str,
    ) -> Result<(), AvroShapeError> {
        let Some(Element::Object(object)) = element else {
            return Err(shape(path, "expected an object"));
        };
        // Few of a resource's many fields are present: place the present ones by name, then
        // write every field in schema order, the rest as absent.
        let mut present: SmallVec<[(usize, &Element); 16]> = SmallVec::new();
        // Resources mostly list their elements in schema order, and names are interned:
        // look for the same pointer among the fields after the last one found before
        // looking the name up.
        let mut next = 0;
        for (name, value) in object {
            let index = match record.names[next..]
                .iter()
                .position(|expected| std::ptr::eq(*expected, *name))
            {
                Some(ahead) => Some(next + ahead),
                None => record.by_name.get(&**name).copied(),
            };
            match index {
                Some(index) => {
                    present.push((index, value));
                    next = index + 1;
                }
                // The envelope's resource_type says it; the resource record has no field.
                None if &**name == "resourceType" => {}
                None => return Err(shape(name, "an element the schema does not have")),
            }
        }
        present.sort_unstable_by_key(|(index, _)| *index);
        let mut written = 0;
        for (index, value) in present {
            if index < written {
                return Err(shape(&record.fields[index].0, "an element given twice"));
            }
            self.write_absent(record, written..index, out)?;
            let (name, field) = &record.fields[index];
            self.write_element(*field, Some(value), out, name)?;
            written = index + 1;
        }
        self.write_absent(record, written..record.fields.len(), out)?;
        Ok(())
    }

    /// The fields `range` of `record`, all absent.
    fn write_absent(
        &self,
        record: &Record,
        range: std::ops::Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<(), AvroShapeError> {
        let mut at = range.start;
        while at < range.end {
            let end = record.run_end[at].min(range.end);
            out.extend_from_slice(&record.absent[at..end]);
            at = end;
            if at < range.end {
                let (name, field) = &record.fields[at];
                self.write_element(*field, None, out, name)?;
                at += 1;
            }
        }
        Ok(())
    }
}

/// Avro `long`/`int`: zig-zag, then base-128 varint.
pub(super) fn varint(value: i64, out: &mut Vec<u8>) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(super) fn string(s: &str, out: &mut Vec<u8>) {
    varint(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn varints_match_apache_avro(value: i64) {
            let mut ours = Vec::new();
            varint(value, &mut ours);
            #[allow(deprecated)]
            let theirs = apache_avro::to_avro_datum(&apache_avro::Schema::Long, apache_avro::types::Value::Long(value)).unwrap();
            prop_assert_eq!(ours, theirs);
        }
    }
}
