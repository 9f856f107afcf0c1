"""The three tours: their steps, explanations and papers (the computations live in the step modules)."""

from headvis_core.errors import InputError
from headvis_core.tours.base import Step, Tour

OLSSON = "Olsson et al. 2022, In-context Learning and Induction Heads"
ELHAGE = "Elhage et al. 2021, A Mathematical Framework for Transformer Circuits"
WANG = "Wang et al. 2022, Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small"
HANNA = "Hanna, Liu and Variengien 2023, How does GPT-2 compute greater-than?"
NANDA = "Nanda 2023, Attribution Patching; Syed, Rager and Conmy 2023, Attribution Patching Outperforms ACDC"
HEADVIS = "Anthropic 2025, HeadVis (attention edge attribution)"

INDUCTION = Tour("induction", "Induction heads", "How a transformer copies a sequence it has seen before: a "
                 "previous-token head writes 'the token before me was A' and an induction head, keyed on that, "
                 "attends from the next A to what followed it.", (
    Step("loss", "The second copy is predicted", "On random tokens repeated twice, nothing in the first copy can "
         "be predicted, but once the sequence repeats a model with induction heads predicts every next token: "
         "the per-token loss drops on the second copy.", OLSSON, "induction:second_copy_loss",
         {"n_seqs": 4, "half_len": 20}),
    Step("previous", "Previous-token heads", "Heads that attend from each token to the one just before it "
         "(the atlas's previous-token score: mean attention to position q-1).", ELHAGE,
         "induction:previous_token_heads", {"n_seqs": 16, "seq_len": 64}),
    Step("induction", "Induction heads", "Heads that, on the second copy, attend to the token after the current "
         "token's earlier occurrence (the atlas's induction score).", OLSSON, "induction:induction_heads",
         {"n_seqs": 16, "seq_len": 64}),
    Step("composition", "K-composition, against a random baseline", "An induction head finds its key by reading "
         "what a previous-token head wrote there: the previous-token head's OV output lands in the induction "
         "head's key input. The composition score measures this from the weights alone, read against random "
         "matrices of the same shapes.", ELHAGE, "induction:k_composition", {"max_edges": 4}),
    Step("patching", "Path patching confirms the edges", "Patch only the path from the previous-token head into "
         "the induction head's keys with its output on a prompt whose first copy is fresh random tokens: if the "
         "edge is used, the prediction of the repeated token suffers.", WANG, "induction:path_patch_edges",
         {"n_prompts": 4, "half_len": 15}),
    Step("ablation", "Ablating the induction heads", "Zero-ablate the induction heads (at hook_z, before W_O): the "
         "second-copy loss should climb back toward the first copy's.", OLSSON,
         "induction:ablate_induction_heads", {"n_seqs": 4, "half_len": 20}),
    Step("attribution", "Attribution of one induction edge", "The induction head's score on one repeated token, "
         "split exactly into what each earlier component wrote into the query and key: the previous-token head "
         "should be among the largest key-side terms.", HEADVIS, "induction:attribution_of_edge",
         {"half_len": 10}),
))

IOI = Tour("ioi", "Indirect object identification", "'When Mary and John went to the store, John gave a drink to' "
           "-> ' Mary': name movers copy the name that is not repeated, S-inhibition heads tell them which one is "
           "repeated, and induction and duplicate-token heads detect the repeat.", (
    Step("logit_diff", "The logit difference", "The model's preference for the indirect object over the subject, "
         "logit(IO) - logit(S) at the last token, on IOI prompts and on their ABC corruptions (three different "
         "names, nothing repeated).", WANG, "ioi:logit_difference_step", {"n_prompts": 8}),
    Step("name_movers", "Name movers: direct effect on the logits", "Path patching each head's direct path to the "
         "logits with its output on the ABC prompts ranks the heads by direct effect; name movers also attend to "
         "the indirect object and copy it (positive OV copying score). Attribution patching ranks all heads by "
         "total effect from one backward pass; the top ones are then mean-ablated exactly.", f"{WANG}; {NANDA}",
         "ioi:name_movers", {"n_prompts": 8, "candidates": 10, "refine": 10}),
    Step("s_inhibition", "S-inhibition heads", "Which earlier heads write into the name movers' queries (and those "
         "of the three heads with the largest direct effect) what makes them avoid the subject: every edge into "
         "these queries is ranked by attribution patching, the top ones are path-patched exactly.",
         f"{WANG}; {NANDA}", "ioi:s_inhibition", {"n_prompts": 8, "top_edges": 8}),
    Step("feeders", "Induction and duplicate-token heads", "At the repeated name, induction and duplicate-token "
         "heads signal that it is a repeat; the S-inhibition heads read that through their values.", WANG,
         "ioi:induction_duplicate_feeders", {"n_prompts": 8, "per_role": 3, "atlas_seqs": 16,
                                               "atlas_len": 64}),
    Step("roles", "Roles next to GPT-2 small's", "The roles found here beside the published circuit of GPT-2 "
         "small, by relative depth.", WANG, "ioi:roles_table", {}),
    Step("faithfulness", "Faithfulness of the circuit", "Mean-ablate every head outside the found circuit (the roles "
         "found and the three heads with the largest direct effect; over the ABC prompts) and compare the logit "
         "difference with the full model's.", WANG, "ioi:faithfulness",
         {"n_prompts": 8}),
))

GREATER_THAN = Tour("greater-than", "Greater-than with years", "'The war lasted from the year 1732 to the year 17' "
                    "-> an ending above 32: the model compares numbers it has read.", (
    Step("sweep", "The year sweep", "Sweep YY over 02..98 in one batch and read the model's probability on the "
         "endings above YY and on those at or below it.", HANNA, "greater_than:answer_probabilities", {}),
    Step("difference", "The probability difference across YY", "P(ending > YY) - P(ending <= YY) for every YY, "
         "with the ranges of years where it is positive.", HANNA, "greater_than:probability_difference", {}),
    Step("heads", "The heads that read the year", "Every head's attention from the last token to YY across the "
         "sweep, and how it moves with the probability difference.", f"{HANNA}; HeadVis year sweep",
         "greater_than:year_heads", {}),
))

TOURS = {tour.key: tour for tour in (INDUCTION, IOI, GREATER_THAN)}


def get_tour(key: str) -> Tour:
    if key not in TOURS:
        raise InputError(f"No tour called {key!r}; there are: {', '.join(TOURS)}.")
    return TOURS[key]
