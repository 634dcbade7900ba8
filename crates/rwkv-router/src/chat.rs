//! The RWKV World chat prompt (spec §5.4): `"User: ...\n\nAssistant:"` turns, no space after the
//! final colon, and no blank line inside a message (`\n\n` is the turn separator).

use crate::error::ApiError;

/// One chat message as the API receives it, reduced to role and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What ends an assistant turn: the model writes `\n\n` after its reply.
pub const TURN_END: &str = "\n\n";

/// Cleans one message: `\r\n` becomes `\n`, surrounding whitespace goes, and runs of newlines
/// collapse to one, so the message cannot contain the turn separator.
pub fn clean(text: &str) -> String {
    let text = text.replace("\r\n", "\n");
    let mut out = String::with_capacity(text.len());
    for c in text.trim().chars() {
        if c == '\n' && out.ends_with('\n') {
            continue;
        }
        out.push(c);
    }
    out
}

fn speaker(role: &str, index: usize) -> Result<&'static str, ApiError> {
    match role {
        "system" | "developer" => Ok("System"),
        "user" => Ok("User"),
        "assistant" => Ok("Assistant"),
        other => Err(ApiError::invalid(
            &format!("messages[{index}].role"),
            format!("unknown role `{other}`; expected system, user or assistant"),
        )),
    }
}

/// The prompt for `messages`, ending with `"Assistant:"` so the model writes the next reply.
pub fn render(messages: &[ChatMessage]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "must contain at least one message",
        ));
    }
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        let who = speaker(&m.role, i)?;
        prompt.push_str(who);
        prompt.push_str(": ");
        prompt.push_str(&clean(&m.content));
        prompt.push_str(TURN_END);
    }
    prompt.push_str("Assistant:");
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn the_world_format_with_a_system_turn() {
        let prompt = render(&[
            msg("system", "Be brief."),
            msg("user", "hi"),
            msg("assistant", " Hello!"),
            msg("user", "Two\r\n\r\n\nparagraphs\n"),
        ])
        .unwrap();
        assert_eq!(
            prompt,
            "System: Be brief.\n\nUser: hi\n\nAssistant: Hello!\n\nUser: Two\nparagraphs\n\nAssistant:"
        );
    }

    #[test]
    fn the_spec_example_has_no_space_after_the_final_colon() {
        assert_eq!(
            render(&[msg("user", "hi")]).unwrap(),
            "User: hi\n\nAssistant:"
        );
    }

    #[test]
    fn unknown_roles_and_empty_conversations_are_refused() {
        let e = render(&[msg("tool", "x")]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert!(render(&[]).is_err());
    }
}
