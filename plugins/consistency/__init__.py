"""Few-step generators (DMD2's backward simulation) and the consistency family (CD, LCM, sCM)."""
