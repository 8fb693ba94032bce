//! A compiled Avro writer and reader for canonical events: the event schema turned once into
//! a plan of nodes, then each event written straight from its resource tree into Avro
//! binary — and read straight back with the plan of the writer's schema version — without an
//! intermediate `apache_avro::types::Value` tree or validating it again.
//!
//! The binary encoding is the Avro specification's
//! (<https://avro.apache.org/docs/1.11.1/specification/#binary-encoding>): zig-zag varint
//! ints and longs, length-prefixed UTF-8 strings, a union as its branch index then the
//! value, an array as one block (count, items) and a zero, a record as its fields in order.
//! Correctness is held by tests that read the bytes back with apache-avro and with Python
//! fastavro.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};
use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use super::{avro::AvroShapeError, CanonicalEvent, EventOp, KeyColumn, Provenance};
use crate::fhir::Element;

/// One schema node; records and arrays refer to other nodes by index, so recursive types
/// are plain cycles in the arena.
#[derive(Debug, Clone)]
enum Node {
    Null,
    Boolean,
    Int,
    Long,
    String,
    TimestampMicros,
    Enum(Vec<String>),
    Array(usize),
    /// A `["null", T]` union: the index of the null branch and of T, and T.
    Nullable {
        null: u8,
        value: u8,
        node: usize,
    },
    /// Boxed: records are few, and the other nodes stay small and close together.
    Record(Box<Record>),
}

/// A record's fields in schema order, and their positions by name for lookups.
#[derive(Debug, Clone)]
struct Record {
    fields: Vec<(String, usize)>,
    /// The field names as resources carry them (shared, not copied per event).
    names: Vec<crate::fhir::Name>,
    /// Per field: a FHIR decimal kept as its text (`"fhirType": "decimal"`).
    decimal: Vec<bool>,
    /// Field name → index into `fields`.
    by_name: FxHashMap<String, usize>,
    /// Per field, the byte an absent value is written as (a nullable's null branch, an
    /// empty array); 0 where `run_end` says there is none.
    absent: Vec<u8>,
    /// Per field, the end of the run of fields from it on whose absence is one known byte:
    /// a run of absent fields is one copy from `absent`. Equal to the field's own index
    /// when it cannot be absent, or is written as nothing.
    run_end: Vec<usize>,
}

/// The compiled writer of one event schema.
#[derive(Debug, Clone)]
pub struct EventWriter {
    nodes: Vec<Node>,
    root: usize,
    /// What each field of the envelope, and of its provenance record, holds: recognized
    /// once by name (`None`: a field this writer does not know).
    envelope: Vec<Option<Field>>,
    provenance: Vec<Option<Field>>,
}

/// The envelope's and provenance's fields, recognized once by name when a schema is
/// compiled; the writer and the reader both go by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Field {
    EventId,
    ResourceType,
    ResourceId,
    ResourceVersion,
    Op,
    Domain,
    Sensitivity,
    Resource,
    Provenance,
    SourceSystem,
    Connector,
    DatabaseKind,
    Database,
    Schema,
    Table,
    PrimaryKey,
    SourcePosition,
    TransactionId,
    CommitTime,
    CaptureTime,
    MappingId,
    MappingVersion,
    Snapshot,
}

impl Field {
    const ENVELOPE: [Field; 9] = [
        Field::EventId,
        Field::ResourceType,
        Field::ResourceId,
        Field::ResourceVersion,
        Field::Op,
        Field::Domain,
        Field::Sensitivity,
        Field::Resource,
        Field::Provenance,
    ];
    const PROVENANCE: [Field; 14] = [
        Field::SourceSystem,
        Field::Connector,
        Field::DatabaseKind,
        Field::Database,
        Field::Schema,
        Field::Table,
        Field::PrimaryKey,
        Field::SourcePosition,
        Field::TransactionId,
        Field::CommitTime,
        Field::CaptureTime,
        Field::MappingId,
        Field::MappingVersion,
        Field::Snapshot,
    ];

    /// The field of `among` called `name` in the schema.
    fn named(among: &[Field], name: &str) -> Option<Self> {
        among.iter().copied().find(|field| field.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::ResourceType => "resource_type",
            Field::ResourceId => "resource_id",
            Field::ResourceVersion => "resource_version",
            Field::Op => "op",
            Field::Domain => "domain",
            Field::Sensitivity => "sensitivity",
            Field::Resource => "resource",
            Field::Provenance => "provenance",
            Field::SourceSystem => "source_system",
            Field::Connector => "connector",
            Field::DatabaseKind => "database_kind",
            Field::Database => "database",
            Field::Schema => "schema",
            Field::Table => "table",
            Field::PrimaryKey => "primary_key",
            Field::SourcePosition => "source_position",
            Field::TransactionId => "transaction_id",
            Field::CommitTime => "commit_time",
            Field::CaptureTime => "capture_time",
            Field::MappingId => "mapping_id",
            Field::MappingVersion => "mapping_version",
            Field::Snapshot => "snapshot",
        }
    }
}

impl EventWriter {
    /// Compile `schema` (an event schema from [`super::schema`]).
    pub fn new(schema: &Schema) -> Result<Self, AvroShapeError> {
        let resolved =
            apache_avro::schema::ResolvedSchema::try_from(schema).map_err(|e| AvroShapeError {
                path: String::new(),
                problem: e.to_string(),
            })?;
        let mut compiler = Compiler {
            names: resolved.get_names(),
            nodes: Vec::new(),
            named: HashMap::new(),
        };
        let root = compiler.compile(schema)?;
        let mut nodes = compiler.nodes;
        // Most of a resource's fields are absent: their one byte is known in advance.
        let absent_byte = |node: &Node| match node {
            Node::Nullable { null, .. } => Some(*null << 1),
            Node::Array(_) => Some(0),
            _ => None,
        };
        for i in 0..nodes.len() {
            if let Node::Record(record) = &nodes[i] {
                let bytes: Vec<Option<u8>> = record
                    .fields
                    .iter()
                    .map(|(_, field)| absent_byte(&nodes[*field]))
                    .collect();
                let mut run_end = vec![bytes.len(); bytes.len()];
                for at in (0..bytes.len()).rev() {
                    if bytes[at].is_none() {
                        run_end[at] = at;
                    } else if at + 1 < bytes.len() {
                        run_end[at] = run_end[at + 1];
                    }
                }
                if let Node::Record(record) = &mut nodes[i] {
                    record.absent = bytes.iter().map(|b| b.unwrap_or(0)).collect();
                    record.run_end = run_end;
                }
            }
        }
        let fields_of = |node: usize| match &nodes[node] {
            Node::Record(record) => record.fields.as_slice(),
            _ => &[],
        };
        let envelope: Vec<_> = fields_of(root)
            .iter()
            .map(|(name, _)| Field::named(&Field::ENVELOPE, name))
            .collect();
        let provenance = fields_of(root)
            .iter()
            .zip(&envelope)
            .find(|(_, field)| **field == Some(Field::Provenance))
            .map(|((_, node), _)| {
                fields_of(*node)
                    .iter()
                    .map(|(name, _)| Field::named(&Field::PROVENANCE, name))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            nodes,
            root,
            envelope,
            provenance,
        })
    }

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
                Some(Field::Op) => {
                    let op = match event.op {
                        EventOp::Upsert => "upsert",
                        EventOp::Delete => "delete",
                    };
                    self.write_str(node, op, out, name)?
                }
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

/// Avro binary being read.
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Result<u8, AvroShapeError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| shape("", "the message ends early"))?;
        self.at += 1;
        Ok(b)
    }

    fn long(&mut self) -> Result<i64, AvroShapeError> {
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

    fn text(&mut self) -> Result<&'a str, AvroShapeError> {
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

    /// The item count of the next array block (a negative count is followed by a size).
    fn block(&mut self) -> Result<usize, AvroShapeError> {
        let count = self.long()?;
        if count < 0 {
            self.long()?;
        }
        usize::try_from(count.unsigned_abs()).map_err(|_| shape("", "an absurd block count"))
    }
}

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
        let mut input = Input { bytes, at: 0 };
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
                "normal" => crate::mapping::Sensitivity::Normal,
                "restricted" => crate::mapping::Sensitivity::Restricted,
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
    fn read_text(
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
                let mut out = Vec::new();
                for (i, (_, field)) in record.fields.iter().enumerate() {
                    if let Some(value) = self.read_element(*field, record.decimal[i], input)? {
                        out.push((record.names[i], value));
                    }
                }
                (!out.is_empty()).then_some(Element::Object(out))
            }
        })
    }

    /// The resource record at `node` onto `out` as the members of a JSON object, each with a
    /// leading comma (the caller writes the braces and `resourceType`), its `id` into `id`;
    /// false, with nothing written, when it is absent or empty.
    fn write_json_resource(
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
                let start = out.len();
                out.push(b'{');
                let mut any = false;
                self.write_json_members(record, input, out, &mut any, None)?;
                json_close(out, start, any, b'}')
            }
        })
    }

    /// Past a value of `node` without keeping it.
    fn skip(&self, node: usize, input: &mut Input<'_>) -> Result<(), AvroShapeError> {
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
            Node::Array(items) => loop {
                let count = input.block()?;
                if count == 0 {
                    break;
                }
                for _ in 0..count {
                    self.skip(*items, input)?;
                }
            },
            Node::Nullable { null, node, .. } => {
                if input.long()? != i64::from(*null) {
                    self.skip(*node, input)?;
                }
            }
            Node::Record(record) => {
                for (_, field) in &record.fields {
                    self.skip(*field, input)?;
                }
            }
        }
        Ok(())
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
fn json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("writing into memory cannot fail");
}

fn shape(path: &str, problem: &str) -> AvroShapeError {
    AvroShapeError {
        path: path.to_owned(),
        problem: problem.to_owned(),
    }
}

struct Compiler<'s> {
    names: &'s HashMap<Name, &'s Schema>,
    nodes: Vec<Node>,
    /// Named records already compiled (or being compiled), by full name.
    named: HashMap<Name, usize>,
}

impl Compiler<'_> {
    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn compile(&mut self, schema: &Schema) -> Result<usize, AvroShapeError> {
        Ok(match schema {
            Schema::Null => self.push(Node::Null),
            Schema::Boolean => self.push(Node::Boolean),
            Schema::Int => self.push(Node::Int),
            Schema::Long => self.push(Node::Long),
            Schema::String => self.push(Node::String),
            Schema::TimestampMicros => self.push(Node::TimestampMicros),
            Schema::Enum(e) => self.push(Node::Enum(e.symbols.clone())),
            Schema::Array(array) => {
                let items = self.compile(&array.items)?;
                self.push(Node::Array(items))
            }
            Schema::Union(union) => match union.variants() {
                [a, b] if matches!(a, Schema::Null) != matches!(b, Schema::Null) => {
                    let (null, value, inner) = if matches!(a, Schema::Null) {
                        (0, 1, b)
                    } else {
                        (1, 0, a)
                    };
                    let node = self.compile(inner)?;
                    self.push(Node::Nullable { null, value, node })
                }
                _ => {
                    return Err(shape(
                        "",
                        "only [\"null\", T] unions are used by event schemas",
                    ))
                }
            },
            Schema::Ref { name } => match self.named.get(name) {
                Some(index) => *index,
                None => {
                    let target = *self
                        .names
                        .get(name)
                        .ok_or_else(|| shape("", &format!("unknown named type {name}")))?;
                    self.compile(target)?
                }
            },
            Schema::Record(record) => {
                if let Some(index) = self.named.get(&record.name) {
                    return Ok(*index);
                }
                // Reserve the slot first: fields may refer back to this record.
                let index = self.push(Node::Null);
                self.named.insert(record.name.clone(), index);
                let mut fields = Vec::with_capacity(record.fields.len());
                let mut decimal = Vec::with_capacity(record.fields.len());
                for field in &record.fields {
                    fields.push((field.name.clone(), self.compile(&field.schema)?));
                    decimal.push(
                        field
                            .custom_attributes
                            .get(super::schema::FHIR_TYPE_ATTRIBUTE)
                            .and_then(|v| v.as_str())
                            == Some("decimal"),
                    );
                }
                let names = fields.iter().map(|(n, _)| crate::fhir::intern(n)).collect();
                let by_name = fields
                    .iter()
                    .enumerate()
                    .map(|(i, (n, _))| (n.clone(), i))
                    .collect();
                self.nodes[index] = Node::Record(Box::new(Record {
                    fields,
                    names,
                    decimal,
                    by_name,
                    absent: Vec::new(),
                    run_end: Vec::new(),
                }));
                index
            }
            _ => return Err(shape("", "a schema type event schemas do not use")),
        })
    }
}

/// Avro `long`/`int`: zig-zag, then base-128 varint.
fn varint(value: i64, out: &mut Vec<u8>) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn string(s: &str, out: &mut Vec<u8>) {
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
            let theirs = apache_avro::to_avro_datum(&Schema::Long, apache_avro::types::Value::Long(value)).unwrap();
            prop_assert_eq!(ours, theirs);
        }
    }
}
