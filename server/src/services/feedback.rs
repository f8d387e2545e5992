//! Feedback on adapters: the rules of an upload, whatever protocol carries it. Records become
//! conversations to imitate (through a plugin's converter for its domain records) or
//! preferences between two answers, the adapter is created on first feedback, the records are
//! stored in one transaction, and past `train_after` a job starts unless one is already active.

use tessera_adapters::peft::{alpha_is_valid, rank_is_valid, MAX_ALPHA, MAX_RANK};
use tessera_adapters::{AdapterKind, TargetModule};

use crate::access::Scope;
use crate::dataset::preference::{parse_feedback_upload, Feedback, Preference};
use crate::dataset::{parse_records, validate as validate_conversation, Conversation, Message, RecordError};
use crate::store::NewFeedback;
use super::plugins::Plugins;
use super::ServiceError;
use crate::grammar::Grammars;
use crate::plugins::PluginError;
use crate::train::job::{TuneError, Tuner};
use crate::train::lora::LoraSpec;

fn invalid(param: &str, message: String) -> ServiceError {
    ServiceError::invalid(param, message)
}

/// The adapter kind `name` says (`lora`, `dora` or `ia3`); `param` names the field.
pub fn adapter_kind(name: &str, param: &str) -> Result<AdapterKind, ServiceError> {
    AdapterKind::from_name(name).ok_or_else(|| invalid(param, format!("unknown adapter kind `{name}`: lora, dora or ia3")))
}

/// The adapter a first upload creates, from its `method` (`lora`, `dora` or `ia3`), `rank`,
/// `alpha` and comma-separated `targets` (each optional: LoRA, r = 16, α = 2r, all seven
/// modules; IA³ has none of the three); `None` when none is given.
pub fn lora_spec(method: Option<&str>, rank: Option<usize>, alpha: Option<f32>, targets: Option<&str>) -> Result<Option<LoraSpec>, ServiceError> {
    let kind = method.map(|m| adapter_kind(m, "method")).transpose()?;
    if kind.is_none() && rank.is_none() && alpha.is_none() && targets.is_none() {
        return Ok(None);
    }
    let kind = kind.unwrap_or_default();
    if kind == AdapterKind::Ia3 {
        if let Some(param) = [("rank", rank.is_some()), ("alpha", alpha.is_some()), ("targets", targets.is_some())].iter().find(|(_, given)| *given) {
            return Err(invalid(param.0, format!("IA³ has no {}: it scales k_proj, v_proj and down_proj", param.0)));
        }
    }
    let rank = rank.unwrap_or(16);
    if !rank_is_valid(rank) {
        return Err(invalid("rank", format!("the rank must be between 1 and {MAX_RANK}")));
    }
    let alpha = alpha.unwrap_or(2.0 * rank as f32);
    if !alpha_is_valid(alpha) {
        return Err(invalid("alpha", format!("alpha must be finite, above 0 and at most {MAX_ALPHA}")));
    }
    let targets = match targets {
        None => TargetModule::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|t| TargetModule::from_peft_name(t.trim()).ok_or_else(|| invalid("targets", format!("unknown target module `{t}`"))))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(Some(LoraSpec { rank, alpha, targets, kind }))
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct FeedbackOutcome {
    pub adapter: String,
    pub stored: usize,
    pub duplicates: usize,
    pub total_pairs: usize,
    pub total_preferences: usize,
    pub pairs_since_training: usize,
    /// The job this upload started.
    pub job: Option<String>,
}

/// Stores an upload of records for `name` (an adapter, or a plugin whose tuned adapter takes
/// them), all or nothing, as `scope`. Blocking: parsing, plugin calls and the store.
pub fn upload(tuner: &Tuner, plugins: &Plugins, grammars: &Grammars, name: String, body: &[u8], spec: Option<LoraSpec>, scope: Scope) -> Result<FeedbackOutcome, ServiceError> {
    let (adapter, records) = records(plugins, name, body)?;
    keeps_shape(plugins, grammars, &adapter, &records)?;
    let (mut pairs, mut preferences) = (Vec::new(), Vec::new());
    for (_, record) in records {
        match record {
            Feedback::Pair(conversation) => pairs.push(conversation),
            Feedback::Preference(preference) => preferences.push(preference),
        }
    }
    let inserted = tuner.store_feedback(&adapter, spec, scope, NewFeedback { pairs: &pairs, preferences: &preferences })?;
    let job = if inserted.pairs_since_training >= tuner.settings.train_after {
        match tuner.start_feedback_job(&adapter, None, scope) {
            Ok(job) => Some(job.id),
            // The database settles it: one job is already active.
            Err(TuneError::Busy { .. }) => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    Ok(FeedbackOutcome {
        total_pairs: tuner.store.count_pairs(&adapter)?,
        total_preferences: tuner.store.count_preferences(&adapter)?,
        adapter,
        stored: inserted.stored,
        duplicates: inserted.duplicates,
        pairs_since_training: if job.is_some() { 0 } else { inserted.pairs_since_training },
        job,
    })
}

/// Refuses an upload for an adapter a plugin tunes when a record's answer to imitate (a pair's
/// last assistant message, a preference's chosen answer) breaks the shape the plugin declares.
/// A rejected answer may break it: that can be why it was rejected.
fn keeps_shape(plugins: &Plugins, grammars: &Grammars, adapter: &str, records: &[(usize, Feedback)]) -> Result<(), ServiceError> {
    let Some((plugin, shape)) = plugins.shape_of_tuned(adapter) else { return Ok(()) };
    for (index, record) in records {
        let answer = match record {
            Feedback::Pair(conversation) => match conversation.messages.iter().rev().find(|m| m.role == "assistant") {
                Some(answer) => &answer.content,
                None => continue,
            },
            Feedback::Preference(Preference { chosen, .. }) => chosen,
        };
        if !grammars.accepts(&shape, answer).map_err(ServiceError::internal)? {
            let reason = format!("the answer `{answer}` does not have the shape the plugin `{plugin}` declares for its answers");
            return Err(refused(RecordError { index: *index, reason }));
        }
    }
    Ok(())
}

/// An invalid record: the whole upload is refused, naming it.
fn refused(e: RecordError) -> ServiceError {
    ServiceError::Invalid {
        param: Some(format!("records[{}]", e.index)),
        message: format!("{e}; nothing from this upload was stored"),
        code: Some("invalid_record"),
    }
}

/// The upload's records as pairs and preferences, and the adapter they are for: the named one,
/// or for a plugin's domain records the adapter the plugin tunes, through its converter (which
/// makes pairs). A plugin that misbehaves is marked failed.
/// Each record comes with the index of the upload's record it came from.
fn records(plugins: &Plugins, name: String, body: &[u8]) -> Result<(String, Vec<(usize, Feedback)>), ServiceError> {
    let Some(plugin) = plugins.lease(&name).transpose()? else {
        return Ok((name, parse_feedback_upload(body).map_err(refused)?.into_iter().enumerate().collect()));
    };
    let adapter = plugin
        .info
        .adapters
        .iter()
        .find(|a| a.source == tessera_plugin_api::AdapterSource::Tuned)
        .map(|a| a.name.clone())
        .ok_or_else(|| invalid("name", format!("the plugin `{name}` has no adapter tuned online")))?;
    let fault = |e: PluginError| plugins.fault(&plugin, e);
    let mut conversations = Vec::new();
    for (index, record) in parse_records(body).map_err(refused)?.iter().enumerate() {
        let converted = match plugin.convert(record) {
            Err(PluginError::Refused(reason)) => return Err(refused(RecordError { index, reason })),
            other => other.map_err(fault)?,
        };
        for pair in converted {
            let conversation = Conversation {
                messages: pair.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect(),
            };
            if let Err(reason) = validate_conversation(&conversation) {
                return Err(fault(PluginError::Garbage { plugin: name.clone(), hook: "convert_feedback", message: reason }));
            }
            conversations.push((index, Feedback::Pair(conversation)));
        }
    }
    Ok((adapter, conversations))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_uploads_lora_is_bounded() {
        assert_eq!(lora_spec(None, None, None, None).unwrap(), None);
        let spec = lora_spec(None, Some(4), None, Some("q_proj, v_proj")).unwrap().unwrap();
        assert_eq!((spec.rank, spec.alpha, spec.targets), (4, 8.0, vec![TargetModule::Q, TargetModule::V]));
        for (rank, alpha, param) in [(Some(0), None, "rank"), (Some(257), None, "rank"), (None, Some(f32::NAN), "alpha"), (None, Some(0.0), "alpha"), (None, Some(1025.0), "alpha")] {
            match lora_spec(None, rank, alpha, None) {
                Err(ServiceError::Invalid { param: p, .. }) => assert_eq!(p.as_deref(), Some(param)),
                other => panic!("{rank:?} {alpha:?}: {other:?}"),
            }
        }
        assert!(matches!(lora_spec(None, None, None, Some("lm_head")), Err(ServiceError::Invalid { .. })));
    }
}
