//! Checks every API (HTTP and gRPC) runs on what a request names: its model and its prompt.

use crate::error::ApiError;
use crate::Router;

/// The model a request runs on: the one it names, else the configured default, else the only
/// model the cluster serves.
pub fn resolve_model(state: &Router, model: &mut String) -> Result<(), ApiError> {
    if model.is_empty() {
        let models = state.pool.models();
        match models.as_slice() {
            [only] => *model = only.clone(),
            [] => return Err(ApiError::unavailable("no worker is ready")),
            _ => {
                return Err(ApiError::invalid(
                    "model",
                    format!(
                        "`model` is required: this cluster serves {}",
                        models.join(", ")
                    ),
                ))
            }
        }
    }
    if state
        .pool
        .workers()
        .iter()
        .any(|w| w.record.model == *model)
    {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

pub fn encode(state: &Router, text: &str, field: &str) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::invalid(field, format!("cannot tokenize `{field}`: {e}")))
}

pub fn check_prompt(state: &Router, tokens: &[u32], field: &str) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must not be empty"),
        ));
    }
    if tokens.len() > state.cfg.max_prompt_tokens {
        let mut e = ApiError::invalid(
            field,
            format!(
                "`{field}` has {} tokens, more than this server's limit of {}",
                tokens.len(),
                state.cfg.max_prompt_tokens
            ),
        );
        e.code = Some("context_length_exceeded");
        return Err(e);
    }
    check_vocab(state, tokens, field)
}

/// Token ids from a client must name tokens of the vocabulary.
pub fn check_vocab(state: &Router, tokens: &[u32], field: &str) -> Result<(), ApiError> {
    let vocab = state.tokenizer.vocab_size();
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(ApiError::invalid(
            field,
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        )),
        None => Ok(()),
    }
}
