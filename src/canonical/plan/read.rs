//! Reading an event back from Avro binary along the plan of the schema that wrote it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{
    json::{json_string, JsonResource},
    shape, EventWriter, Field, Node,
};
use crate::{
    canonical::{avro::AvroShapeError, CanonicalEvent, EventOp, KeyColumn, Provenance},
    fhir::Element,
};

/// How deep records and arrays may nest in a message. A resource nests a few levels (an
/// extension's extension, an item's item); a recursive schema lets a hostile message nest
/// as deep as its bytes go, which reading by recursion would follow off the stack.
const MAX_DEPTH: u32 = 128;

/// Avro binary being read.
pub(super) struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Records and arrays entered and not yet left.
    depth: u32,
}

impl<'a> Input<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Input {
            bytes,
            at: 0,
            depth: 0,
        }
    }

    /// Into a record or an array, at most [`MAX_DEPTH`] deep.
    pub(super) fn enter(&mut self) -> Result<(), AvroShapeError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(shape(
                "",
                &format!("records and arrays nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    /// Out of the record or array last entered.
    pub(super) fn leave(&mut self) {
        self.depth -= 1;
    }

    pub(super) fn byte(&mut self) -> Result<u8, AvroShapeError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| shape("", "the message ends early"))?;
        self.at += 1;
        Ok(b)
    }

    pub(super) fn long(&mut self) -> Result<i64, AvroShapeError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
        }
        Err(shape("", "a varint longer than 64 bits"))
    }

    pub(super) fn text(&mut self) -> Result<&'a str, AvroShapeError> {
        let len = usize::try_from(self.long()?).map_err(|_| shape("", "a negative length"))?;
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| shape("", "the message ends early"))?;
        let text = std::str::from_utf8(&self.bytes[self.at..end])
            .map_err(|_| shape("", "a string that is not UTF-8"))?;
        self.at = end;
        Ok(text)
    }

    /// The item count of the next array block (a negative count is followed by a size). No
    /// item of an event schema is written in zero bytes, so a count beyond the bytes left is
    /// a lie (a hostile one would have the reader loop for ever over nothing).
    pub(super) fn block(&mut self) -> Result<usize, AvroShapeError> {
        let count = self.long()?;
        if count < 0 {
            self.long()?;
        }
        usize::try_from(count.unsigned_abs())
            .ok()
            .filter(|count| *count <= self.bytes.len() - self.at)
            .ok_or_else(|| shape("", "an array block longer than the message"))
    }
}

impl EventWriter {
    /// The event in `bytes` (an Avro body written with this schema — any compatible version
    /// of it: fields the reader does not know are skipped).
    pub fn read(&self, bytes: &[u8]) -> Result<CanonicalEvent, AvroShapeError> {
        let (mut event, resource) =
            self.read_parts(bytes, |input, node| self.read_element(node, false, input))?;
        event.resource = resource.map(|body| {
            // The envelope says the type; FHIR JSON has it first.
            let Element::Object(fields) = body else {
                return body;
            };
            let mut with_type = Vec::with_capacity(fields.len() + 1);
            with_type.push((
                crate::fhir::names().resource_type,
                Element::text(event.resource_type.as_str()),
            ));
            with_type.extend(fields);
            Element::Object(with_type)
        });
        Ok(event)
    }

    /// The event in `bytes` without its resource, and the resource as FHIR JSON, written as
    /// it is read — for a reader that stores the JSON and has no use for the tree (building
    /// it, serializing it and freeing it was most of the projector's own work).
    pub fn read_json(
        &self,
        bytes: &[u8],
    ) -> Result<(CanonicalEvent, Option<JsonResource>), AvroShapeError> {
        let (event, resource) = self.read_parts(bytes, |input, node| {
            let mut fields = Vec::with_capacity(2 * bytes.len());
            let mut id = None;
            Ok(self
                .write_json_resource(node, input, &mut fields, &mut id)?
                .then_some((fields, id)))
        })?;
        let resource = resource.map(|(fields, id)| {
            let mut json = Vec::with_capacity(fields.len() + event.resource_type.len() + 20);
            json.extend_from_slice(b"{\"resourceType\":");
            json_string(&mut json, &event.resource_type);
            json.extend_from_slice(&fields);
            json.push(b'}');
            JsonResource {
                json: String::from_utf8(json).expect("JSON written from UTF-8 text"),
                id,
            }
        });
        Ok((event, resource))
    }

    /// The envelope and provenance in `bytes`, and the resource as `read_resource` reads it
    /// (`None`: absent or empty).
    fn read_parts<R>(
        &self,
        bytes: &[u8],
        mut read_resource: impl FnMut(&mut Input<'_>, usize) -> Result<Option<R>, AvroShapeError>,
    ) -> Result<(CanonicalEvent, Option<R>), AvroShapeError> {
        let mut input = Input::new(bytes);
        let Node::Record(record) = &self.nodes[self.root] else {
            unreachable!("event schemas are records")
        };
        let (mut event_id, mut resource_type, mut resource_id, mut resource_version) =
            (None, None, None, None);
        let (mut op, mut domain, mut sensitivity, mut resource, mut provenance) =
            (None, None, None, None, None);
        for ((name, node), field) in record.fields.iter().zip(&self.envelope) {
            let node = *node;
            let input = &mut input;
            match field {
                Some(Field::EventId) => event_id = self.read_text(node, input, name)?,
                Some(Field::ResourceType) => resource_type = self.read_text(node, input, name)?,
                Some(Field::ResourceId) => resource_id = self.read_text(node, input, name)?,
                Some(Field::ResourceVersion) => {
                    resource_version = self.read_text(node, input, name)?
                }
                Some(Field::Op) => op = self.read_text(node, input, name)?,
                Some(Field::Domain) => domain = self.read_text(node, input, name)?,
                Some(Field::Sensitivity) => sensitivity = self.read_text(node, input, name)?,
                Some(Field::Resource) => resource = read_resource(input, node)?,
                Some(Field::Provenance) => provenance = Some(self.read_provenance(node, input)?),
                _ => self.skip(node, input)?,
            }
        }
        let need = |value: Option<String>, field: Field| {
            value.ok_or_else(|| shape(field.name(), "missing from the writer's schema"))
        };
        let resource_type = need(resource_type, Field::ResourceType)?;
        let event = CanonicalEvent {
            event_id: need(event_id, Field::EventId)?,
            resource_id: need(resource_id, Field::ResourceId)?,
            resource_version: need(resource_version, Field::ResourceVersion)?,
            op: match need(op, Field::Op)?.as_str() {
                "upsert" => EventOp::Upsert,
                "delete" => EventOp::Delete,
                _ => return Err(shape("op", "neither upsert nor delete")),
            },
            domain: need(domain, Field::Domain)?.into(),
            sensitivity: match need(sensitivity, Field::Sensitivity)?.as_str() {
                "normal" => crate::fhir::Sensitivity::Normal,
                "restricted" => crate::fhir::Sensitivity::Restricted,
                _ => return Err(shape("sensitivity", "neither normal nor restricted")),
            },
            resource_type,
            resource: None,
            provenance: provenance.ok_or_else(|| shape("provenance", "missing"))?,
        };
        Ok((event, resource))
    }

    fn read_provenance(
        &self,
        node: usize,
        input: &mut Input<'_>,
    ) -> Result<Provenance, AvroShapeError> {
        let Node::Record(record) = &self.nodes[node] else {
            return Err(shape("provenance", "expected a record"));
        };
        let mut text: HashMap<Field, Option<String>> = HashMap::new();
        let (mut primary_key, mut commit_time, mut capture_time, mut snapshot) =
            (Vec::new(), None, None, false);
        for ((name, node), field) in record.fields.iter().zip(&self.provenance) {
            let node = *node;
            match field {
                Some(Field::PrimaryKey) => {
                    let Node::Array(item) = self.nodes[node] else {
                        return Err(shape(name, "expected an array"));
                    };
                    let Node::Record(key_record) = &self.nodes[item] else {
                        return Err(shape(name, "expected records"));
                    };
                    let key_fields = &key_record.fields;
                    loop {
                        let count = input.block()?;
                        if count == 0 {
                            break;
                        }
                        for _ in 0..count {
                            let (mut column, mut value) = (None, None);
                            for (key_name, key_node) in key_fields {
                                match key_name.as_str() {
                                    "column" => {
                                        column = self.read_text(*key_node, input, key_name)?
                                    }
                                    "value" => {
                                        value = self.read_text(*key_node, input, key_name)?
                                    }
                                    _ => self.skip(*key_node, input)?,
                                }
                            }
                            primary_key.push(KeyColumn {
                                column: column
                                    .ok_or_else(|| shape(name, "a key without its column"))?,
                                value,
                            });
                        }
                    }
                }
                Some(Field::CommitTime) => commit_time = self.read_time(node, input)?,
                Some(Field::CaptureTime) => capture_time = self.read_time(node, input)?,
                Some(Field::Snapshot) => snapshot = input.byte()? != 0,
                Some(field) if matches!(self.nodes[node], Node::String | Node::Nullable { .. }) => {
                    let value = self.read_text(node, input, name)?;
                    text.insert(*field, value);
                }
                _ => self.skip(node, input)?,
            }
        }
        let mut take = |field: Field| {
            text.remove(&field)
                .flatten()
                .ok_or_else(|| shape(field.name(), "missing from the provenance"))
        };
        Ok(Provenance {
            source_system: take(Field::SourceSystem)?.into(),
            connector: take(Field::Connector)?.into(),
            database_kind: take(Field::DatabaseKind)?.into(),
            database: take(Field::Database)?.into(),
            schema: take(Field::Schema)?.into(),
            table: take(Field::Table)?.into(),
            primary_key,
            source_position: take(Field::SourcePosition)?,
            transaction_id: take(Field::TransactionId).ok(),
            commit_time,
            capture_time: capture_time
                .ok_or_else(|| shape(Field::CaptureTime.name(), "missing"))?,
            mapping_id: take(Field::MappingId)?.into(),
            mapping_version: take(Field::MappingVersion)?.into(),
            snapshot,
        })
    }

    fn read_time(
        &self,
        node: usize,
        input: &mut Input<'_>,
    ) -> Result<Option<DateTime<Utc>>, AvroShapeError> {
        match &self.nodes[node] {
            Node::TimestampMicros => DateTime::from_timestamp_micros(input.long()?)
                .map(Some)
                .ok_or_else(|| shape("", "a time out of range")),
            Node::Nullable { null, node, .. } => {
                if input.long()? == i64::from(*null) {
                    Ok(None)
                } else {
                    self.read_time(*node, input)
                }
            }
            _ => Err(shape("", "expected a timestamp")),
        }
    }

    /// A string, enum symbol or nullable of those; `None` for null.
    pub(super) fn read_text(
        &self,
        node: usize,
        input: &mut Input<'_>,
        path: &str,
    ) -> Result<Option<String>, AvroShapeError> {
        Ok(match &self.nodes[node] {
            Node::String => Some(input.text()?.to_owned()),
            Node::Enum(symbols) => {
                let index = usize::try_from(input.long()?).ok();
                Some(
                    index
                        .and_then(|i| symbols.get(i))
                        .ok_or_else(|| shape(path, "an enum index out of range"))?
                        .clone(),
                )
            }
            Node::Nullable { null, node, .. } => {
                if input.long()? == i64::from(*null) {
                    None
                } else {
                    self.read_text(*node, input, path)?
                }
            }
            _ => return Err(shape(path, "expected text")),
        })
    }

    /// A resource element; `None` when absent (null) or empty.
    fn read_element(
        &self,
        node: usize,
        decimal: bool,
        input: &mut Input<'_>,
    ) -> Result<Option<Element>, AvroShapeError> {
        Ok(match &self.nodes[node] {
            Node::Null => None,
            Node::Boolean => Some(Element::Boolean(input.byte()? != 0)),
            Node::Int | Node::Long => Some(Element::Number(input.long()?.into())),
            Node::String if decimal => {
                let text = input.text()?;
                Some(Element::Number(text.parse().map_err(|_| {
                    shape("", "a decimal field holds no decimal")
                })?))
            }
            Node::String => Some(Element::String(input.text()?.to_owned())),
            Node::Enum(_) | Node::TimestampMicros => {
                self.read_text(node, input, "")?.map(Element::String)
            }
            Node::Array(items) => {
                input.enter()?;
                let mut out = Vec::new();
                loop {
                    let count = input.block()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        if let Some(item) = self.read_element(*items, decimal, input)? {
                            out.push(item);
                        }
                    }
                }
                input.leave();
                (!out.is_empty()).then_some(Element::Array(out))
            }
            Node::Nullable { null, node, .. } => {
                if input.long()? == i64::from(*null) {
                    None
                } else {
                    self.read_element(*node, decimal, input)?
                }
            }
            Node::Record(record) => {
                input.enter()?;
                let mut out = Vec::new();
                for (i, (_, field)) in record.fields.iter().enumerate() {
                    if let Some(value) = self.read_element(*field, record.decimal[i], input)? {
                        out.push((record.names[i], value));
                    }
                }
                input.leave();
                (!out.is_empty()).then_some(Element::Object(out))
            }
        })
    }

    /// Past a value of `node` without keeping it.
    pub(super) fn skip(&self, node: usize, input: &mut Input<'_>) -> Result<(), AvroShapeError> {
        match &self.nodes[node] {
            Node::Null => {}
            Node::Boolean => {
                input.byte()?;
            }
            Node::Int | Node::Long | Node::Enum(_) | Node::TimestampMicros => {
                input.long()?;
            }
            Node::String => {
                input.text()?;
            }
            Node::Array(items) => {
                input.enter()?;
                loop {
                    let count = input.block()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        self.skip(*items, input)?;
                    }
                }
                input.leave();
            }
            Node::Nullable { null, node, .. } => {
                if input.long()? != i64::from(*null) {
                    self.skip(*node, input)?;
                }
            }
            Node::Record(record) => {
                input.enter()?;
                for (_, field) in &record.fields {
                    self.skip(*field, input)?;
                }
                input.leave();
            }
        }
        Ok(())
    }
}
