"""Research tooling that reads run dirs (never the loop): minimizers, sweep reports, figures, reproduce."""
