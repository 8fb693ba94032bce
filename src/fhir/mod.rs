//! HL7 FHIR R4 (4.0.1): the definitions mappings are checked against.

mod definitions;

pub use definitions::{definitions, Definitions, ElementType, PathError, ResolvedPath, Segment};
