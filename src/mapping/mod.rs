//! Declarative mappings from legacy tables to FHIR R4 resources (see `docs/mapping.md`).
//!
//! [`load_dir`] reads and checks mapping files against the FHIR R4 definitions, reporting
//! every problem with `file:line:column`; a [`Mapper`] runs them on changes and yields
//! canonical events.

mod apply;
mod convert;
mod load;
mod location;
mod lookup;
mod mapper;
mod model;
mod shape;
mod template;

pub use self::{
    apply::{resource_id, MapContext, MapError},
    convert::{to_fhir, Conversion, Primitive},
    load::{load_dir, load_file, load_str, unmade_references, CODE_TABLE_SUFFIX},
    location::{LoadError, LoadErrors, Location},
    mapper::{MapFailure, MapOutcome, Mapper},
    model::{
        source_tables, with_lookups, ChoiceGroup, Condition, ElementMapping, Lookup, Mapping,
        OnMissing, Protect, RequiredNode, ResourceMapping, Test, Translation, Unmapped,
        ValueSource,
    },
    template::{RenderError, Template},
};
