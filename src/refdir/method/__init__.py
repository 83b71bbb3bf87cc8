"""The paper's method: instruction data, the prompt screen, activations, candidate directions, selection
(the paper's selector and COSMIC), the interventions and edits, and the refusal metric."""
