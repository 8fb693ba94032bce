//! The schema registry is real and speaks the Confluent API: a schema registered under a
//! TopicNameStrategy subject comes back by id, and schema_registry_converter encodes and
//! decodes a record in the Confluent wire format against it.

use apache_avro::{types::Value, Decimal};
use schema_registry_converter::{
    async_impl::{
        avro::{AvroDecoder, AvroEncoder},
        schema_registry::{get_schema_by_id, post_schema, SrSettings},
    },
    schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema},
};

use crate::stack;

const SCHEMA: &str = r#"{
  "type": "record",
  "name": "Smoke",
  "namespace": "fhir_cdc.smoke",
  "fields": [
    {"name": "resource_id", "type": "string"},
    {"name": "version", "type": "long"},
    {"name": "value", "type": {"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": 4}}
  ]
}"#;

#[tokio::test]
async fn a_schema_registers_reads_back_by_id_and_encodes_in_the_wire_format() {
    let settings = SrSettings::new(stack::registry_url());
    let topic = stack::unique("smoke_registry");
    let subject = format!("{topic}-value");

    let registered = post_schema(
        &settings,
        subject.clone(),
        SuppliedSchema::new(None, SchemaType::Avro, SCHEMA.to_owned()),
    )
    .await
    .unwrap();

    let fetched = get_schema_by_id(registered.id, &settings).await.unwrap();
    let as_json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(
        as_json(&fetched.schema),
        as_json(SCHEMA),
        "the registry changed the schema"
    );
    assert_eq!(fetched.schema_type, SchemaType::Avro);

    // 12.3400 as an exact decimal: unscaled 123400 at scale 4.
    let unscaled = 123_400_i64.to_be_bytes().to_vec();
    let encoder = AvroEncoder::new(settings.clone());
    let bytes = encoder
        .encode(
            vec![
                ("resource_id", Value::String("obs-1".into())),
                ("version", Value::Long(7)),
                ("value", Value::Decimal(Decimal::from(unscaled.clone()))),
            ],
            SubjectNameStrategy::TopicNameStrategy(topic.clone(), false),
        )
        .await
        .unwrap();
    assert_eq!(bytes[0], 0, "Confluent magic byte");
    assert_eq!(
        u32::from_be_bytes(bytes[1..5].try_into().unwrap()),
        registered.id,
        "schema id"
    );

    let decoded = AvroDecoder::new(settings)
        .decode(Some(&bytes))
        .await
        .unwrap();
    let Value::Record(fields) = decoded.value else {
        panic!("not a record: {:?}", decoded.value)
    };
    assert_eq!(
        fields[0],
        ("resource_id".to_owned(), Value::String("obs-1".into()))
    );
    assert_eq!(fields[1], ("version".to_owned(), Value::Long(7)));
    let Value::Decimal(value) = &fields[2].1 else {
        panic!("not a decimal: {:?}", fields[2])
    };
    let digits: Vec<u8> = value.try_into().unwrap();
    assert_eq!(
        i64::from_be_bytes(digits.as_slice().try_into().unwrap()),
        123_400,
        "the decimal's digits changed"
    );
}
