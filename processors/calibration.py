"""Calibration sentences for the static int8 embedder: fixed, generic English, written for
memstream (no benchmark text), so the quantized model and its activation scales are the same
on every machine. Short and long, statements and questions, first and third person, dates and
numbers: the ranges of what memories and queries look like.
"""

from __future__ import annotations

SENTENCES: tuple[str, ...] = (
    "Hello!",
    "Thanks, see you soon.",
    "What time is it?",
    "Where did you park the car?",
    "Good morning, how are you today?",
    "I am fine, thank you.",
    "The meeting was moved to Thursday afternoon.",
    "She bought a new bicycle last week.",
    "Can you remind me to call the dentist tomorrow?",
    "My brother lives in Toronto with his two dogs.",
    "We had pasta for dinner and watched an old movie.",
    "The train to the airport leaves every twenty minutes.",
    "He said the report would be ready by Monday.",
    "I have been learning to play the guitar since March.",
    "Our team won the regional football tournament in 2021.",
    "The library closes early on public holidays.",
    "What is the name of the restaurant we went to in June?",
    "Anna said: I finally finished painting the kitchen walls yellow.",
    "Tom said: My favourite book is a long novel about a sailor.",
    "Priya said: I started a new job as a nurse at the city hospital.",
    "Marco said: We are planning a trip to the mountains next summer.",
    "Lena said: I adopted a cat from the shelter two weeks ago.",
    "David said: The concert last night was louder than I expected.",
    "Sofia said: I volunteer at the food bank every Saturday morning.",
    "James said: I hurt my knee while running and had to stop training.",
    "Mia said: My grandmother taught me how to bake bread when I was ten.",
    "Omar said: I moved to a smaller apartment closer to the office.",
    "Yuki said: I passed my driving test on the second attempt!",
    "Ben said: Honestly, I am not sure that was a good idea.",
    "Nora said: Yes, absolutely, let's do it again sometime.",
    "How long have you been working at the bakery?",
    "Why did the flight get cancelled yesterday?",
    "When is your sister's birthday party?",
    "Who recommended the new dentist to you?",
    "Did you ever visit the museum downtown?",
    "What kind of music do you like to listen to while cooking?",
    "The weather forecast says it will rain all weekend.",
    "Prices at the grocery store went up again this month.",
    "I forgot my umbrella at the office, so I got completely soaked.",
    "The children built a sandcastle on the beach and named it after their dog.",
    "After the storm, the neighbours helped each other clear the fallen trees.",
    "My phone battery dies quickly since the last software update.",
    "The garden is full of tomatoes, beans and a few sunflowers.",
    "She plays the piano in a small jazz band on Friday nights.",
    "He wants to become a teacher because he enjoys helping people learn.",
    "We celebrated our tenth wedding anniversary with a quiet dinner at home.",
    "The project deadline was extended by two weeks after the client asked for changes.",
    "I read somewhere that walking for thirty minutes a day improves sleep.",
    "Our landlord promised to fix the heating before the winter starts.",
    "The bus was late again, so I missed the first part of the lecture.",
    "They opened a small coffee shop on the corner of Main Street in 2019.",
    "I keep a journal where I write down three good things every evening.",
    "My daughter lost her first tooth yesterday and put it under her pillow.",
    "The doctor told me to drink more water and take a break from screens.",
    "We are saving money to buy a house with a big garden for the kids.",
    "I switched to a vegetarian diet at the beginning of the year.",
    "The hiking trail goes along the river and ends at a waterfall.",
    "On 3 October 2022 we drove eight hours to see my parents.",
    "The package arrived on Tuesday, 14 February, two days early.",
    "It costs about 250 dollars a month to keep the car running.",
    "The marathon is 42 kilometres long and I finished it in just under five hours.",
    "Last spring I spent three weeks in Portugal, mostly in Lisbon and Porto.",
    "I think the second option is cheaper, but the first one looks better.",
    "Sorry, I can't make it tonight; something came up at work.",
    "That sounds wonderful! I'm so happy for you and your family.",
    "Oh no, I hope everything is okay with your mother.",
    "Really? I had no idea you could speak Japanese.",
    "I'm nervous about the interview, but I've prepared a lot for it.",
    "It was the best day of my life, and I will never forget it.",
    "I feel a bit lonely since my best friend moved abroad.",
    "My goal this year is to read one book every month and run a half marathon.",
    "The software crashed when I tried to save the file, and I lost an hour of work.",
    "Please send me the slides from yesterday's presentation when you have a moment.",
    "The committee will review all applications and announce the results in May.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The city council voted to build a new bicycle lane along the harbour.",
    "Local farmers sell fresh vegetables at the market every Wednesday.",
    "The museum's new exhibition shows paintings from the early twentieth century.",
    "A small fire in the kitchen was put out quickly and nobody was hurt.",
    "The school is raising money for new computers and a bigger playground.",
    "I usually wake up at six, make coffee, and go for a short walk before work.",
    "When I was younger I wanted to be an astronaut, but now I design bridges.",
    "My uncle repairs old clocks in his workshop and sells them at antique fairs.",
    "We got lost in the old town because every street looked exactly the same.",
    "She finally told her boss that she needs more time to care for her father.",
    "I have two cats, Pepper and Salt, and they hate each other.",
    "The kids love the playground near our house, especially the tall slide.",
    "I've been thinking about going back to university to study history.",
    "My neighbour plays the drums late at night and it drives me crazy.",
    "We planted an apple tree in the backyard the day our son was born.",
    "Grandpa used to tell us stories about his years working on a fishing boat.",
    "I signed up for a pottery class that meets every Tuesday evening.",
    "The team celebrated the launch with pizza and a game of table tennis.",
    "My favourite season is autumn because of the colours and the cool air.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "I'm allergic to peanuts, so I always check the ingredients carefully.",
    "The new bridge shortened my commute from forty minutes to fifteen.",
    "We spent the whole afternoon at the lake, swimming and reading in the shade.",
    "Last winter the pipes froze and we had no running water for three days, so we "
    "stayed with friends across town and learned to appreciate a hot shower.",
    "When my friend and I finally reached the top of the mountain after a six-hour climb, "
    "the clouds opened and we could see the whole valley, the river and the little village "
    "where we had started in the morning.",
    "I told my manager that I would like to lead the next project, because I have worked "
    "on every part of the system and I think I understand what the customers need.",
    "Our family tradition is to cook a big meal together on the first Sunday of every month, "
    "and everyone brings one dish that reminds them of a place they have lived.",
    "The volunteers cleaned the park, planted flowers along the paths, repaired the old "
    "benches and painted a mural on the wall next to the children's playground.",
    "She explained that the company will move its headquarters to a new building next year, "
    "which means a longer commute for most of the staff but much better offices.",
    "After months of practice, my daughter performed her first solo at the school concert, "
    "and although her hands were shaking, she played every note perfectly.",
    "I remember the summer we drove across the country in an old van with no air "
    "conditioning, sleeping in campgrounds and eating sandwiches for almost every meal.",
    "The article argued that cities should invest in public transport, green spaces and "
    "affordable housing instead of building more roads and parking garages.",
    "Because the printer at the office kept jamming, we ordered a new one, but the delivery "
    "was delayed twice and in the end we borrowed one from the team downstairs.",
    "My best friend from school is getting married in September in a small church by the "
    "sea, and she asked me to give a speech at the reception.",
    "What was the name of the song you sang at the talent show, and did you write it "
    "yourself or was it a cover of something you heard on the radio?",
    "How did you decide which university to go to, and do you ever regret not choosing the "
    "one closer to home where most of your friends went?",
    "During the power cut we lit candles, played board games and told stories until the "
    "lights came back on a little after midnight.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt, half a cup of milk "
    "and a spoonful of honey, mixed slowly and baked for twenty-five minutes.",
    "I was worried that nobody would come to the exhibition of my photographs, but more "
    "than a hundred people showed up, including my old art teacher.",
    "Running the charity bake sale took much more work than we expected, but we raised "
    "almost two thousand dollars for the animal shelter.",
    "The hospital hired more nurses this year, opened a new children's ward and started a "
    "programme that lets patients talk to a doctor by video from home.",
    "When I started my own business, I had no idea how to do accounting, so I took an "
    "evening course and now I do all the books myself.",
    "Although the weather was terrible, the festival went ahead, and people danced in the "
    "rain wearing plastic ponchos and rubber boots.",
    "My parents met at a dance in 1979, got married two years later, and still go dancing "
    "together every Friday night at the community hall.",
    "Can you tell me again what the doctor said about the results of your blood test, and "
    "whether you need to go back for another appointment?",
    "If the weather is good on Saturday, we could take the kids to the zoo, have a picnic "
    "by the pond and then visit your sister on the way home.",
    "The neighbourhood association organises a street party every July, with live music, "
    "food stalls and games for children, and the whole street is closed to cars.",
)
