//! The plan: an event schema compiled once into an arena of nodes.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};

use super::{shape, EventWriter, Field, Node, Record};
use crate::canonical::avro::AvroShapeError;

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
        // Whatever the registry serves: an event is a record.
        if !matches!(compiler.nodes[root], Node::Record(_)) {
            return Err(shape("", "the schema is not a record: not an event schema"));
        }
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
                            .get(crate::canonical::schema::FHIR_TYPE_ATTRIBUTE)
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
