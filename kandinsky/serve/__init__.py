"""Kandinsky Studio: ``kandinsky serve``, a browser app (Gradio) for every task and for looking inside.

    kandinsky serve --demo                      # http://127.0.0.1:7860, the shipped shapes model
    kandinsky serve --prior P --decoder D --inpaint I --port 8000

Three modules, the page on top of two that know nothing of Gradio:

* canvas.py: the pure picture logic of painting (reading uploads safely, the mask from painted layers,
  feathering, cropping around the mask and pasting back, outpainting);
* studio.py: ``Studio``: the models (loaded once, lazily per checkpoint kind, shared by all requests),
  one run at a time, each request with its own generator; the parameters, as a PNG ``parameters`` chunk;
* app.py: the Gradio page (one tab per task, derived from kandinsky.pipelines.tasks) and its API
  endpoints (/text2img, /img2img, /inpaint, /variations, /mix).

Nothing imports this package but the ``serve`` command (kandinsky/cli/serve.py), lazily: Gradio is an
optional extra (``pip install -e ".[serve]"``). docs/studio.md explains every control and the API.
"""
