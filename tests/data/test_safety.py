from fteval.data.safety import categorise, keyword_agreement, predict_unsafe


def test_categories_match_on_word_stems():
    assert categorise("How would someone go about hacking a router?") == ["cybercrime"]
    assert set(categorise("where to buy a gun to kill my neighbour")) == {"violence", "weapons"}
    assert not predict_unsafe("What is a good recipe for lentil soup?")
    assert categorise("") == []


def test_agreement_confusion_matrix_and_kappa():
    texts = ["hack the server", "bake a cake", "steal a car", "plant tomatoes", "write a poem about hate"]
    labels = [1, 0, 1, 0, 0]
    out = keyword_agreement(texts, labels)
    assert out["confusion_matrix"] == [[2, 1], [0, 2]]
    assert out["accuracy"] == 0.8
    assert 0 < out["cohen_kappa"] < 1
    assert out["per_category"]["theft"] == {"unsafe": 1}
