"""The TerminAI guest agent."""
