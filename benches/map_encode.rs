//! Map + encode throughput for a typical lab result row → Observation, on one core.
//!
//! `cargo bench --bench map_encode` prints events/s for mapping alone, Avro encoding alone,
//! and both, with serde_json serialization of the same resource as the peer measured in
//! the same run (a ratio travels between machines better than a rate).

#![allow(deprecated)] // to_avro_datum: the body of a Confluent-framed message

use std::{
    hint::black_box,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use apache_avro::{to_avro_datum, Schema};
use chrono::{NaiveDate, Utc};
use fhir_cdc::{
    canonical::{event_to_avro, schema::event_schema, EventWriter},
    change::{ChangeEvent, ExactDecimal, Operation, PgLsn, Position, Row, SourceTable, Value},
    mapping::{load_dir, MapContext, Mapper},
};

// The allocator the fhir-cdc binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn result_change(i: u64) -> ChangeEvent {
    let decimal = |s: &str| Value::Decimal(ExactDecimal::parse(s).unwrap());
    let collected = NaiveDate::from_ymd_opt(2024, 3, 5)
        .unwrap()
        .and_hms_opt(14, 30, 0)
        .unwrap();
    insert(
        "lab_result",
        "result_id",
        i,
        vec![
            ("result_id", Value::Int(i as i64)),
            ("accession_no", Value::Text(format!("A24-{:06}", i / 8))),
            ("mrn", Value::Text("MRN0000042".into())),
            ("test_code", Value::Text("GLU       ".into())),
            ("value_numeric", decimal("98.0000")),
            ("value_text", Value::Null),
            ("units", Value::Text("mg/dL".into())),
            ("ref_low", decimal("70.0000")),
            ("ref_high", decimal("99.0000")),
            ("abnormal_flag", Value::Text("N".into())),
            ("result_status", Value::Text("F".into())),
            ("collected_at", Value::Timestamp(collected)),
            ("verified_at", Value::TimestampTz(Utc::now().fixed_offset())),
            ("comment", Value::Null),
        ],
    )
}

/// Runs `f` over the inputs repeatedly for about `budget`; events per second.
fn rate<T>(inputs: &[T], budget: Duration, mut f: impl FnMut(&T)) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < budget {
        for input in inputs {
            f(input);
        }
        done += inputs.len() as u64;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mappings = load_dir(&root.join("mappings")).expect("sample mappings");
    let mappings_of_results: Vec<_> = mappings
        .iter()
        .filter(|m| m.table == "lis.lab_result")
        .cloned()
        .collect();
    let context = MapContext {
        token_key: Some(fhir_cdc::config::Secret::new("bench-token-key")),
        ..MapContext::default()
    };
    let mapper = Mapper::new(mappings, context.clone(), "urn:oid:2.16.840.1.113883.19.5").unwrap();
    let coded = coded_mapper(root);
    let schema = Schema::parse(&event_schema("Observation")).unwrap();
    let changes: Vec<ChangeEvent> = (0..1000).map(result_change).collect();
    let events: Vec<_> = changes
        .iter()
        .map(|c| mapper.map(c).events.remove(0))
        .collect();
    let budget = Duration::from_secs(3);
    // `cargo bench --bench map_encode -- map` (or `-- encode`, `-- apply`, `-- both`) runs
    // only that loop, for profiling.
    if std::env::args().any(|a| a == "apply") {
        // The resource alone, without the event around it.
        let observation = &mappings_of_results[0].resources[0];
        let apply = rate(&changes, budget * 3, |c| {
            black_box(
                observation
                    .apply(c.after.as_ref().unwrap(), &context)
                    .unwrap(),
            );
        });
        println!("apply {apply:.0} events/s");
        return;
    }
    if std::env::args().any(|a| a == "map") {
        let map = rate(&changes, budget * 3, |c| {
            black_box(mapper.map(c));
        });
        println!("map {map:.0} events/s");
        return;
    }
    if std::env::args().any(|a| a == "encode") {
        let writer = EventWriter::new(&schema).unwrap();
        let mut buffer = Vec::with_capacity(4096);
        let encode = rate(&events, budget * 3, |e| {
            buffer.clear();
            writer.write(e, &mut buffer).unwrap();
            black_box(&buffer);
        });
        println!("encode {encode:.0} events/s");
        return;
    }

    if std::env::args().any(|a| a == "both") {
        let writer = EventWriter::new(&schema).unwrap();
        let mut buffer = Vec::with_capacity(4096);
        let both = rate(&changes, budget * 3, |c| {
            let event = mapper.map(c).events.remove(0);
            buffer.clear();
            writer.write(&event, &mut buffer).unwrap();
            black_box(&buffer);
        });
        println!("map + encode {both:.0} events/s");
        return;
    }

    let peer = rate(&events, budget, |e| {
        black_box(serde_json::to_vec(e.resource.as_ref().unwrap()).unwrap());
    });
    let map = rate(&changes, budget, |c| {
        black_box(mapper.map(c));
    });
    let generic = rate(&events, budget, |e| {
        black_box(to_avro_datum(&schema, event_to_avro(e, &schema).unwrap()).unwrap());
    });
    let writer = EventWriter::new(&schema).unwrap();
    let mut buffer = Vec::with_capacity(4096);
    let encode = rate(&events, budget, |e| {
        buffer.clear();
        writer.write(e, &mut buffer).unwrap();
        black_box(&buffer);
    });
    let both = rate(&changes, budget, |c| {
        let event = mapper.map(c).events.remove(0);
        buffer.clear();
        writer.write(&event, &mut buffer).unwrap();
        black_box(&buffer);
    });
    let size = to_avro_datum(&schema, event_to_avro(&events[0], &schema).unwrap())
        .unwrap()
        .len();
    println!(
        "lab result row → Observation, one core, {} distinct rows, {}-byte Avro body",
        changes.len(),
        size
    );
    println!("  peer: serde_json::to_vec of the resource  {peer:>10.0} events/s");
    println!(
        "  map                                       {map:>10.0} events/s  ({:.2}× peer)",
        map / peer
    );
    println!(
        "  Avro encode, apache-avro Value + datum    {generic:>10.0} events/s  ({:.2}× peer)",
        generic / peer
    );
    println!(
        "  Avro encode, compiled EventWriter         {encode:>10.0} events/s  ({:.2}× peer)",
        encode / peer
    );
    println!(
        "  map + encode                              {both:>10.0} events/s  ({:.2}× peer)",
        both / peer
    );
    let lookups = rate(&coded_changes(), budget, |c| {
        black_box(coded.map(c));
    });
    println!(
        "  map, two lookups (coded result → catalogue 1,000 rows, patients)  {lookups:>10.0} events/s  ({:.2}× peer)",
        lookups / peer
    );
}

/// The `i`th change, an insert of `columns` into `lis.table`.
fn insert(table: &str, key: &str, i: u64, columns: Vec<(&str, Value)>) -> ChangeEvent {
    ChangeEvent {
        source: Arc::new(SourceTable::new(
            "lab-postgres",
            "postgres",
            "lab",
            "lis",
            table,
        )),
        op: Operation::Insert,
        key: vec![key.into()].into(),
        before: None,
        after: Some(Row::new(
            columns.into_iter().map(|(c, v)| (c.into(), v)).collect(),
        )),
        position: Position::Postgres(PgLsn(0x1A2B_3C00 + i)),
        ordinal: 0,
        transaction_id: Some(i.to_string()),
        commit_time: Some(Utc::now()),
        capture_time: Utc::now(),
    }
}

/// The mapper of `tests/golden/mappings-lookups`, its catalogue holding 1,000 codes and its
/// patient lookup 3 patients.
fn coded_mapper(root: &Path) -> Mapper {
    let mappings = load_dir(&root.join("tests/golden/mappings-lookups")).expect("lookup mappings");
    let mapper = Mapper::new(
        mappings,
        MapContext::default(),
        "urn:oid:2.16.840.1.113883.19.5",
    )
    .unwrap();
    let text = |s: String| Value::Text(s);
    for i in 0..1000 {
        let code = insert(
            "test_catalogue",
            "local_code",
            i,
            vec![
                ("local_code", text(format!("T{i}"))),
                ("loinc_code", text(format!("{}-{}", 1000 + i, i % 10))),
                (
                    "loinc_name",
                    text(format!("Test {i} [Mass/volume] in Serum or Plasma")),
                ),
            ],
        );
        assert!(mapper.remember(&code).is_empty());
    }
    for i in 0..3 {
        let patient = insert(
            "patient",
            "patient_no",
            i,
            vec![
                ("patient_no", Value::Int(i as i64)),
                ("mrn", text(format!("M{i:06}"))),
            ],
        );
        assert!(mapper.remember(&patient).is_empty());
    }
    mapper
}

/// Result rows reading the catalogue and the patients of [`coded_mapper`].
fn coded_changes() -> Vec<ChangeEvent> {
    (0..1000)
        .map(|i: u64| {
            insert(
                "coded_result",
                "result_id",
                i,
                vec![
                    ("result_id", Value::Int(i as i64)),
                    ("test_code", Value::Text(format!("T{}", (i * 7) % 1000))),
                    ("patient_no", Value::Int(i as i64 % 3)),
                    (
                        "result_value",
                        Value::Decimal(ExactDecimal::parse("5.40").unwrap()),
                    ),
                    ("units", Value::Text("mmol/L".into())),
                    ("result_status", Value::Text("F".into())),
                ],
            )
        })
        .collect()
}
