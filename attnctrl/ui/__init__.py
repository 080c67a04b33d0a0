"""The Gradio web app (``attnctrl ui``, extra ``[ui]``): arrives with its own issue; nothing here runs yet."""
