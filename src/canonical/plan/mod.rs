//! A compiled Avro writer and reader for canonical events: the event schema turned once into
//! a plan of nodes ([`compile`]), then each event written straight from its resource tree
//! into Avro binary ([`write`]) — and read straight back with the plan of the writer's
//! schema version ([`read`]), the resource rendered as FHIR JSON on the way when asked
//! ([`json`]) — without an intermediate `apache_avro::types::Value` tree or validating it
//! again.
//!
//! The binary encoding is the Avro specification's
//! (<https://avro.apache.org/docs/1.11.1/specification/#binary-encoding>): zig-zag varint
//! ints and longs, length-prefixed UTF-8 strings, a union as its branch index then the
//! value, an array as one block (count, items) and a zero, a record as its fields in order.
//! Correctness is held by tests that read the bytes back with apache-avro and with Python
//! fastavro.

mod compile;
mod json;
mod read;
mod write;

use rustc_hash::FxHashMap;

use super::avro::AvroShapeError;

pub use self::json::JsonResource;

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

pub(super) fn shape(path: &str, problem: &str) -> AvroShapeError {
    AvroShapeError {
        path: path.to_owned(),
        problem: problem.to_owned(),
    }
}
