//! The GGUF tokenizer reproduces every reference tokenization exactly.

use tessera_tests::{read_json, real_model, TokenizerCases};

#[test]
fn every_reference_case_encodes_and_round_trips() {
    let tokenizer = &real_model().tokenizer;
    let cases: TokenizerCases = read_json("tokenizer_cases.json");
    assert!(!cases.cases.is_empty());
    let mut failures = Vec::new();
    for case in &cases.cases {
        let plain = tokenizer.encode(&case.text, false, false).unwrap();
        if plain != case.ids {
            failures.push(format!("{:?}\n  ids: got {plain:?}\n  want {:?}", case.text, case.ids));
        }
        let special = tokenizer.encode(&case.text, true, true).unwrap();
        if special != case.ids_with_bos_and_special {
            failures.push(format!(
                "{:?}\n  with bos+special: got {special:?}\n  want {:?}",
                case.text, case.ids_with_bos_and_special
            ));
        }
        let decoded = tokenizer.decode(&plain, false).unwrap();
        if decoded != case.text {
            failures.push(format!("{:?}\n  decoded as {decoded:?}", case.text));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn special_tokens_are_parsed_only_when_asked() {
    let tokenizer = &real_model().tokenizer;
    let turn = tokenizer.piece_to_id("<start_of_turn>").unwrap();
    let parsed = tokenizer.encode("<start_of_turn>user", true, false).unwrap();
    assert_eq!(parsed[0], turn);
    let plain = tokenizer.encode("<start_of_turn>user", false, false).unwrap();
    assert!(!plain.contains(&turn), "{plain:?}");
    assert!(plain.len() > parsed.len());
}
