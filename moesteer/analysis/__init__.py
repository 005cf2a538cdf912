"""What routing traces say: expert discovery (which experts a behaviour or a marker token uses,
for SteerMoE and RICE tables) and expert-usage summaries and plots (``moesteer inspect``, reports)."""
